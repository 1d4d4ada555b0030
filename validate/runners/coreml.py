"""Runs a Core ML artifact (the folder convert/coreml.py writes): on macOS through Core ML itself, elsewhere
through the MIL interpreter (validate/runners/mil), which runs the same packages op by op in numpy.

Both drive the chunk packages the same way: a fresh state per package per sequence; the prompt in blocks
through "prefill" (the last block padded: padding writes K/V past the sequence, which the causal mask
hides and later tokens overwrite); then one token at a time through "decode". Hidden states pass from
each package to the next.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from siliconvert.errors import ArtifactError, RuntimeMissingError
from siliconvert.validate.runners.base import Runner

COMPUTE_UNITS = ("all", "cpu_and_ne", "cpu_and_gpu", "cpu_only")


class CoreMLRunner(Runner):
    """options: compute_units (macOS only); runtime "coreml" or "mil-interpreter" (default by platform)."""

    def __init__(self, path: Path, options: dict) -> None:
        self.path = Path(path)
        unknown = set(options) - {"compute_units", "runtime"}
        if unknown:
            raise ArtifactError(f"unknown Core ML runner option(s): {', '.join(sorted(unknown))}")
        self.manifest = read_manifest(self.path)
        self.context = int(self.manifest["context_length"])
        self.block = int(self.manifest["functions"]["prefill"])
        self.runtime = options.get("runtime") or ("coreml" if sys.platform == "darwin" else "mil-interpreter")
        packages = [self.path / chunk["package"] for chunk in self.manifest["chunks"]]
        if self.runtime == "coreml":
            units = options.get("compute_units", "all")
            self.chunks: list[Any] = [CoreMLPackage(p, units) for p in packages]
            self.device = f"Apple {platform.machine()} (Core ML, compute units: {units})"
        elif self.runtime == "mil-interpreter":
            self.chunks = [InterpretedPackage(p) for p in packages]
            self.device = "CPU (emulated, not Core ML)"
        else:
            raise ArtifactError(f"unknown Core ML runtime {self.runtime!r} (coreml or mil-interpreter)")
        self.tokenizer = load_tokenizer(self.path)
        self._states: list[Any] | None = None  # one per package, for the current sequence
        self._length = 0  # tokens in the current sequence's cache

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return self._prefill(np.asarray(tokens))

    def start(self, prompt: np.ndarray) -> np.ndarray:
        return self._prefill(np.asarray(prompt))[-1]

    def step(self, token: int) -> np.ndarray:
        if self._states is None:
            raise RuntimeError("CoreMLRunner.step before start")
        if self._length >= self.context:
            raise ArtifactError(f"the sequence is full: the package holds {self.context} tokens", self.path)
        logits = self._call("decode", np.array([token], np.int32), self._length)
        self._length += 1
        return logits[0]

    def close(self) -> None:
        self.chunks, self._states = [], None

    def _prefill(self, tokens: np.ndarray) -> np.ndarray:
        """A fresh sequence: `tokens` through the cache in prefill blocks; logits for every position."""
        if not self.chunks:
            raise RuntimeError("CoreMLRunner used after close")
        if tokens.ndim != 1 or not 0 < len(tokens) <= self.context:
            raise ArtifactError(f"a window of {len(tokens)} tokens does not fit the package's context "
                                f"({self.context})", self.path)
        self._states = [chunk.make_state() for chunk in self.chunks]
        blocks = [self._call("prefill", tokens[i : i + self.block], i) for i in range(0, len(tokens), self.block)]
        self._length = len(tokens)
        return np.concatenate(blocks)

    def _call(self, function: str, tokens: np.ndarray, position: int) -> np.ndarray:
        """Run `tokens` (at most the function's width; padded with token 0) through every package."""
        width = int(self.manifest["functions"][function])
        x: np.ndarray = np.zeros((1, width), np.int32)
        x[0, : len(tokens)] = tokens
        for chunk, state, entry in zip(self.chunks, self._states, self.manifest["chunks"], strict=True):
            first_input, position_input = entry["inputs"]
            inputs = {first_input: x, position_input: np.array([position], np.int32)}
            x = chunk.predict(function, inputs, state)[entry["outputs"][0]]
        return np.asarray(x, np.float32)[0, : len(tokens)]


class InterpretedPackage:
    """One chunk package on the MIL interpreter; a state is a dict of numpy arrays."""

    def __init__(self, package: Path):
        from siliconvert.validate.runners.mil import MILProgram

        self.program = MILProgram(package)

    def make_state(self) -> dict[str, np.ndarray]:
        return self.program.make_states("decode")

    def predict(self, function: str, inputs: dict[str, np.ndarray], state: dict) -> dict[str, np.ndarray]:
        return self.program.run(function, inputs, state)


class CoreMLPackage:
    """One chunk package on Core ML (macOS 15+), compiled once, each function loaded from the compiled
    model. Not exercised by this project's tests: they run on Linux, where coremltools cannot predict."""

    def __init__(self, package: Path, compute_units: str):
        if compute_units not in COMPUTE_UNITS:
            raise ArtifactError(f"unknown compute units {compute_units!r} (one of {', '.join(COMPUTE_UNITS)})")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        import coremltools as ct

        release = platform.mac_ver()[0]
        if not release or int(release.split(".")[0]) < 15:
            raise RuntimeMissingError("stateful Core ML models need macOS 15 or later")
        units = {"all": ct.ComputeUnit.ALL, "cpu_and_ne": ct.ComputeUnit.CPU_AND_NE,
                 "cpu_and_gpu": ct.ComputeUnit.CPU_AND_GPU, "cpu_only": ct.ComputeUnit.CPU_ONLY}[compute_units]
        try:
            compiled = ct.utils.compile_model(str(package))
            self.functions = {name: ct.models.CompiledMLModel(compiled, units, function_name=name)
                              for name in ("decode", "prefill")}
        except Exception as e:  # Core ML reports load failures as bare Exceptions
            raise ArtifactError(f"Core ML cannot load this package ({e})", package) from None

    def make_state(self):
        # One state serves both functions: they declare the same key_cache / value_cache.
        return self.functions["decode"].make_state()

    def predict(self, function: str, inputs: dict[str, np.ndarray], state) -> dict[str, np.ndarray]:
        return self.functions[function].predict(inputs, state=state)


def read_manifest(path: Path) -> dict:
    file = path / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"no readable Core ML manifest ({e})", file) from None
    if manifest.get("format") != "siliconvert-coreml" or manifest.get("version") != 1:
        raise ArtifactError("not a siliconvert Core ML manifest (format/version)", file)
    return manifest


def load_tokenizer(path: Path):
    """The tokenizer files copied next to the packages, read the way a Swift app would bundle them."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot load the tokenizer bundled with the packages ({e})", path) from None
