"""Runs a Core ML artifact (the folder convert/coreml/ writes): on macOS through Core ML itself, elsewhere
through the MIL interpreter (validate/runners/mil), which runs the same packages op by op in torch (on CUDA where
there is a GPU, else the CPU; the default) or in numpy (its reference, the option `interpreter: numpy`).

Both drive the chunk packages the same way: a fresh state per package per sequence; the prompt in blocks
through "prefill" (the last block padded: padding writes K/V past the sequence, which the causal mask
hides and later tokens overwrite; a package with recurrent states, which every token advances, also takes the
count of real tokens, its third input, and its states skip the padding); then one token at a time through
"decode". Hidden states pass from each package to the next (and Gemma 4's per-layer inputs from the first
package to every later one). A mixture of experts' packages also output the
experts their routers chose ("expert_ids"), which `expert_choices` gathers for the windows scored.

The work runs chunk-major: a package runs every call of every sequence asked for at once (all the scored
windows, or a prompt and its continuation), keeping each call's hidden states for the next package, before
the next package starts. On the interpreter, a model whose weights exceed RESIDENT_WEIGHT_BYTES (on CUDA: or
half the GPU's free memory, if larger) is run chunk by chunk: only the package running holds its weights, so
memory follows the largest package, not the model.
Such a model decodes greedily in rounds of guessed tokens (`greedy`), and its latency is not measured
(`unmeasured`): it would time reloads, and an emulator's speed says nothing about a device anyway.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siliconvert.errors import ArtifactError, RuntimeMissingError
from siliconvert.progress import track
from siliconvert.validate.runners.base import Runner

COMPUTE_UNITS = ("all", "cpu_and_ne", "cpu_and_gpu", "cpu_only")
INTERPRETERS = ("torch", "numpy")  # what runs the MIL interpreter's ops (validate/runners/mil)
PER_LAYER_INPUTS = "per_layer_inputs"  # an output of the first chunk, an input of the later ones (Gemma 4)
EXPERT_IDS = "expert_ids"  # a chunk output (graph.py names it): the experts its sparse layers chose (1, S, layers, k)
# Weights (as the interpreter holds them: linear layers widened to float32) up to which it keeps every package
# loaded; about 0.27 B parameters. Tests' and the demo's models are far below it, a 7B model far above.
RESIDENT_WEIGHT_BYTES = 1 << 30


@dataclass(frozen=True)
class Call:
    """One function call in a sequence: `tokens` (at most the function's width) written from `position` on."""

    function: str
    tokens: np.ndarray
    position: int


class CoreMLRunner(Runner):
    """options: compute_units (macOS only); runtime "coreml" or "mil-interpreter" (default by platform);
    interpreter: "torch" (default) or "numpy", what runs the MIL interpreter's ops; compute: what the writer
    says the packages compute beyond the model's own work (a mixture of experts'
    experts evaluated per token); state_bytes: the bytes of state a sequence keeps, by state; both shown, not
    used to run."""

    def __init__(self, path: Path, options: dict) -> None:
        self.path = Path(path)
        unknown = set(options) - {"compute_units", "runtime", "interpreter", "compute", "state_bytes"}
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
            self.chunk_by_chunk = False  # Core ML pages its models' weights itself
        elif self.runtime == "mil-interpreter":
            interpreter = options.get("interpreter", "torch")
            if interpreter not in INTERPRETERS:
                raise ArtifactError(f"unknown MIL interpreter {interpreter!r} ({' or '.join(INTERPRETERS)})")
            self.chunks = [InterpretedPackage(p, interpreter) for p in packages]
            engine = self.chunks[0].program.engine
            self.device = f"{engine.device_name} (emulated, not Core ML; {interpreter})"
            resident = max(RESIDENT_WEIGHT_BYTES, (engine.free_bytes() or 0) // 2)
            self.chunk_by_chunk = sum(chunk.program.held_bytes for chunk in self.chunks) > resident
        else:
            raise ArtifactError(f"unknown Core ML runtime {self.runtime!r} (coreml or mil-interpreter)")
        self.tokenizer = load_tokenizer(self.path)
        self._states: dict[int, Any] | None = None  # package index → its state, for the current sequence
        self._expert_choices: np.ndarray | None = None  # of the last logits_many's windows
        self._length = 0  # tokens in the current sequence's cache

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        (rows,) = self._run([self._blocks(np.asarray(tokens))], None)
        return np.concatenate(rows)

    def logits_many(self, windows: np.ndarray) -> np.ndarray:
        """Logits [W, T, vocab] of W windows [W, T], each from a fresh cache; every package runs all of them."""
        windows = np.asarray(windows)
        if windows.ndim != 2:
            raise ValueError(f"windows of shape {windows.shape}, not [windows, tokens]")
        choices: list[list[list[np.ndarray]]] = []
        rows = self._run([self._blocks(window) for window in windows], None, f"logits ({self.runtime})", choices)
        if choices:  # per package, per window, per call (tokens, layers, k) → [windows, tokens, layers, k]
            self._expert_choices = np.stack([
                np.concatenate([np.concatenate(package[w]) for package in choices], axis=1)
                for w in range(len(windows))])
        return np.stack([np.concatenate(window_rows) for window_rows in rows])

    def expert_choices(self) -> np.ndarray | None:
        return self._expert_choices

    def start(self, prompt: np.ndarray) -> np.ndarray:
        prompt = np.asarray(prompt)
        self._states = {}
        ((*_, last),) = self._run([self._blocks(prompt)], [self._states])
        self._length = len(prompt)
        return last[-1]

    def step(self, token: int) -> np.ndarray:
        if self._states is None:
            raise RuntimeError("CoreMLRunner.step before start")
        if self._length >= self.context:
            raise ArtifactError(f"the sequence is full: the package holds {self.context} tokens", self.path)
        ((logits,),) = self._run([[Call("decode", np.array([token]), self._length)]], [self._states])
        self._length += 1
        return logits[0]

    def cached_logits(self, prompt: np.ndarray, continuation: np.ndarray) -> np.ndarray:
        """Logits after the prompt and after each token of `continuation` fed one at a time through "decode"
        (teacher-forced), from a fresh cache: [1 + len(continuation), vocab]. Row i is what the no-cache
        `logits(prompt + continuation)` gives at position len(prompt) - 1 + i; one load of every package."""
        prompt, continuation = np.asarray(prompt), np.asarray(continuation)
        if len(prompt) + len(continuation) > self.context:
            raise ArtifactError(f"the sequence is full: the package holds {self.context} tokens", self.path)
        fed = [Call("decode", continuation[i : i + 1], len(prompt) + i) for i in range(len(continuation))]
        (rows,) = self._run([self._blocks(prompt) + fed], [{}])
        return np.stack([rows[-len(fed) - 1][-1], *(row[0] for row in rows[len(rows) - len(fed):])])

    def unmeasured(self) -> dict[str, str]:
        # an emulator's speed says nothing about a device, and timing it cost a 7B run 20 s of 43 on a GPU
        if self.runtime == "mil-interpreter":
            return {"latency": "the MIL interpreter emulates Core ML: its speed says nothing about a device "
                               "(Core ML's own latency is measured where it runs, on macOS)"}
        return {}

    def close(self) -> None:
        self.chunks, self._states = [], None

    def _blocks(self, tokens: np.ndarray) -> list[Call]:
        """A fresh sequence's calls: `tokens` in prefill blocks."""
        if tokens.ndim != 1 or not 0 < len(tokens) <= self.context:
            raise ArtifactError(f"a window of {len(tokens)} tokens does not fit the package's context "
                                f"({self.context})", self.path)
        return [Call("prefill", tokens[i : i + self.block], i) for i in range(0, len(tokens), self.block)]

    def _run(self, sequences: list[list[Call]], states: list[dict[int, Any]] | None,
             progress: str | None = None, choices: list | None = None) -> list[list[np.ndarray]]:
        """Every sequence's calls, in order, through every package, package after package; per call the
        logits of its tokens [tokens, vocab] (float32). `states`: per sequence, each package's state (made
        where missing, updated in place); None: fresh ones, dropped when their package is done. `progress`:
        a bar by that name counts packages. `choices`: gets, per package with sparse layers, per sequence,
        per call, the experts they chose [tokens, layers, k]."""
        if not self.chunks:
            raise RuntimeError("CoreMLRunner used after close")
        carried = []  # per sequence, per call: the next package's first input
        per_layer: dict[tuple[int, int], np.ndarray] = {}  # (sequence, call) → the first package's PER_LAYER_INPUTS
        for calls in sequences:
            carried.append([])
            for call in calls:
                ids = np.zeros((1, int(self.manifest["functions"][call.function])), np.int32)
                ids[0, : len(call.tokens)] = call.tokens
                carried[-1].append(ids)
        packages = enumerate(zip(self.chunks, self.manifest["chunks"], strict=True))
        if progress:
            packages = track(packages, progress, len(self.chunks))
        for index, (chunk, entry) in packages:
            first_input, position_input, *others = entry["inputs"]
            valid_tokens = [name for name in others if name != PER_LAYER_INPUTS]
            chosen = None
            if choices is not None and EXPERT_IDS in entry["outputs"]:
                chosen = [[] for _ in sequences]
                choices.append(chosen)
            try:
                for sequence, calls in enumerate(sequences):
                    if states is None:
                        state = chunk.make_state()
                    elif index not in states[sequence]:
                        state = states[sequence][index] = chunk.make_state()
                    else:
                        state = states[sequence][index]
                    for i, call in enumerate(calls):
                        inputs = {first_input: carried[sequence][i],
                                  position_input: np.array([call.position], np.int32)}
                        if valid_tokens:
                            inputs[valid_tokens[0]] = np.array([len(call.tokens)], np.int32)
                        if PER_LAYER_INPUTS in others:
                            inputs[PER_LAYER_INPUTS] = per_layer[sequence, i]
                        outputs = chunk.predict(call.function, inputs, state)
                        carried[sequence][i] = outputs[entry["outputs"][0]]
                        if PER_LAYER_INPUTS in entry["outputs"]:
                            per_layer[sequence, i] = outputs[PER_LAYER_INPUTS]
                        if chosen is not None:
                            chosen[sequence].append(np.asarray(outputs[EXPERT_IDS], np.int16)[0, : len(call.tokens)])
            finally:
                if self.chunk_by_chunk:
                    chunk.release_weights()
        return [[np.asarray(x, np.float32)[0, : len(call.tokens)] for x, call in zip(xs, calls, strict=True)]
                for xs, calls in zip(carried, sequences, strict=True)]


class InterpretedPackage:
    """One chunk package on the MIL interpreter; a state is a dict of the engine's arrays."""

    def __init__(self, package: Path, interpreter: str):
        from siliconvert.validate.runners.mil import MILProgram

        self.program = MILProgram(package, interpreter)

    def make_state(self) -> dict[str, np.ndarray]:
        return self.program.make_states("decode")

    def predict(self, function: str, inputs: dict[str, np.ndarray], state: dict) -> dict[str, np.ndarray]:
        return self.program.run(function, inputs, state)

    def release_weights(self) -> None:
        self.program.release_weights()


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
        # One state serves both functions: they declare the same states.
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
