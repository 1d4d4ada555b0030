# siliconvert — the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Machines of this project keep the CPU torch wheel in /opt/wheels; elsewhere pip finds torch as usual.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install demo test lint bench bench-real clean

install: $(STAMP)

# torch first and pinned: on Linux this takes the CPU wheel (a plain `torch` would pull gigabytes of
# CUDA packages); the project's own `torch>=2.4` is then already satisfied.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(WHEELS) "torch==2.13.0"
	$(BIN)/python -m pip install --quiet $(WHEELS) -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/siliconvert recipe recipes/demo.yaml

# One pytest worker per core (xdist); a module's tests stay on one worker, so its fixtures are built once
test: install
	$(BIN)/python -m pytest -q --durations=25 -n auto --dist loadscope

lint: install
	$(BIN)/ruff check .

# The conversion benchmark (bench/README.md): small by default; make bench BENCH_ARGS="--size 7b" for the real one
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# A real model's weights (SmolLM2-135M-Instruct from a registry package): the full recipe beside the anchors
bench-real: install
	$(BIN)/python -m bench.real

clean:
	rm -rf build .pytest_cache
