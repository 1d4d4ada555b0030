#!/usr/bin/env bash
# The bench on a lent GPU machine (issue #29): a bare machine with python3 3.12 and a CUDA torch, no network.
#
#   here, once (network):   bash bench/gpu.sh prepare       # .whl/0, .whl/1: what the machine lacks, ≤ 59 MiB each;
#                                                           # .whl/cache: the demo checkpoint, built here
#   there, one call a part: bash bench/gpu.sh stage          # carry .whl/N; the parts wait in $STAGE between calls
#   there:                  bash bench/gpu.sh install        # a venv over the image's packages, llama.cpp built for CUDA
#   there:                  bash bench/gpu.sh run --size 7b --only c    # bench.run's options; result and logs → $OUT
#
# What is carried (python 3.12, manylinux x86_64; versions of the H100 run of 2026-11-24): mlx 0.32.4 and its CUDA
# backend mlx-cuda-13 0.32.4 (90 MB: more than one call's 64 MiB, so the parts are slices of one tar), mlx-lm
# 0.32.2, gguf 0.19.0, coremltools 9.0 (+ cattrs, pyaml), pydantic 2.14.4 (+ pydantic-core, annotated-types,
# typing-inspection), diskcache, transformers 5.25.0 + huggingface_hub 2.4.0 with the httpx2 it imports (the image's
# 5.17 lacks this year's families), and the llama-cpp-python 0.3.36 sdist without what neither its CUDA build nor
# llama.cpp's converter reads (its .git, vendor/llama.cpp/docs, tests, benches, the web UI, the other backends'
# sources and the tokenizer test vocabularies models/*.gguf): 77 MB → about 7.
# The image has the rest (torch, numpy, safetensors, tokenizers, sentencepiece, click, rich, PyYAML,
# matplotlib, jinja2, nvidia-* CUDA 13 libraries mlx-cuda-13 loads, cmake, ninja, scikit-build-core, nvcc).
#
# The machine stays warm 30 s after a call: make the stage/install/run calls one after the other. llama-cpp-python is
# built with the system g++ (bench/README.md: built with the image's /opt/gcc wrapper, libggml-cuda crashed in
# llama_model::print_info once numpy was imported). MLX keeps the CUDA kernels it compiles in the siliconvert cache
# (validate/runners/mlx.py `keep_cuda_kernels`): a second run on the same machine compiles none.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-/tmp/siliconvert-gpu}
VENV=$STAGE/venv
PART_BYTES=$((59 * 1024 * 1024))  # a call carries 64 MiB, the working tree (about 3 MB) included

prepare() {
    local work=/tmp/siliconvert-gpu-prepare
    rm -rf "$work" .whl && mkdir -p "$work/files" .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/files" \
        mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 gguf==0.19.0 coremltools==9.0 cattrs pyaml \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection diskcache \
        transformers==5.25.0 huggingface_hub==2.4.0 httpx2 httpcore2 truststore
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$work" llama-cpp-python==0.3.36
    tar -xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
    local source=$work/llama_cpp_python-0.3.36
    rm -rf "$source/.git" "$source/vendor/llama.cpp/docs" "$source"/vendor/llama.cpp/models/*.gguf \
        "$source"/vendor/llama.cpp/{tests,benches,media,tools/ui} \
        "$source"/vendor/llama.cpp/ggml/src/ggml-{openvino,webgpu,et,metal,hexagon,sycl,vulkan,opencl,cann,musa,zdnn}
    tar -czf "$work/files/llama_cpp_python-0.3.36.tar.gz" -C "$work" llama_cpp_python-0.3.36
    tar -cf "$work/bundle.tar" -C "$work/files" .
    split -b "$PART_BYTES" -d -a 1 "$work/bundle.tar" "$work/bundle.tar.part-"
    for part in "$work"/bundle.tar.part-*; do
        mkdir -p ".whl/${part##*-}" && mv "$part" ".whl/${part##*-}/"
    done
    local demo
    demo=$(${PYTHON:-.venv/bin/python} -c 'from siliconvert.demo import demo_checkpoint; print(demo_checkpoint())')
    mkdir -p .whl/cache/demo && cp -r "$(echo "$demo" | tail -1)" .whl/cache/demo/
    ls -l "$work/files"
    du -sh .whl/* && echo "carry each .whl/N in its own call: bash bench/gpu.sh stage"
}

stage() {
    mkdir -p "$STAGE/parts"
    cp -v .whl/*/bundle.tar.part-* "$STAGE/parts/" 2>/dev/null || true
    mkdir -p "$STAGE/files" && cp -v .whl/*/*.whl "$STAGE/files/" 2>/dev/null || true  # wheels carried loose
    # the demo checkpoint (11 MB) whose tokenizer the synthetic checkpoint takes: training it there costs 90 s
    if [ -d .whl/cache ]; then mkdir -p "$STAGE/cache" && cp -r .whl/cache/. "$STAGE/cache/"; fi
}

install() {
    mkdir -p "$STAGE/files"
    cat "$STAGE"/parts/bundle.tar.part-* | tar -xf - -C "$STAGE/files"
    python3 -m venv --system-site-packages "$VENV"
    # the image's packages (torch, scikit-build-core, cmake …) may sit in another venv that python3 reaches through
    # PYTHONPATH, which pip drops for a build backend: name every such folder in a .pth of our own
    python3 -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
        > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/image-packages.pth"
    "$VENV/bin/python" -m pip install --quiet --no-index --no-deps "$STAGE"/files/*.whl
    # llama.cpp for CUDA, Hopper only (one architecture: minutes, not tens of minutes), with the system compiler
    CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ \
        CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++" \
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$VENV/bin/python" -m pip install --no-index --no-deps --no-build-isolation \
        "$STAGE/files/llama_cpp_python-0.3.36.tar.gz"
    "$VENV/bin/python" -m pip install --quiet --no-index --no-deps --no-build-isolation .
    "$VENV/bin/siliconvert" doctor
}

run() {
    # the bench's own llama.cpp converter comes from the same sdist (pip download, found here, no network)
    # PIP_NO_BUILD_ISOLATION=0 (pip reads it inverted: no isolation): pip download prepares the sdist's metadata,
    # and an isolated build would fetch scikit-build-core, which this offline machine has only in the image
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=$STAGE/files HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_NO_BUILD_ISOLATION=0
    export SILICONVERT_CACHE=$STAGE/cache
    status=0
    touch "$STAGE/run-started"
    "$VENV/bin/python" -m bench.run "$@" || status=$?
    if [ -n "${OUT:-}" ]; then  # what the device tool brings back: this run's results and the commands' logs
        find bench/results -name '*.json' -newer "$STAGE/run-started" -exec cp {} "$OUT/" \;  # each holds its stages
        tar -czf "$OUT/logs.tar.gz" $(find bench/work -mindepth 2 -maxdepth 2 -name logs -type d) 2>/dev/null || true
    fi
    return $status
}

case "${1:-}" in
    prepare | stage | install) "$1" ;;
    run) shift && run "$@" ;;
    *) echo "usage: bash bench/gpu.sh prepare | stage | install | run [bench.run options]" >&2 && exit 2 ;;
esac
