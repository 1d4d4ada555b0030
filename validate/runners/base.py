"""What every runtime runner does. One runner per runtime (mlx, llama.cpp, Core ML, MIL interpreter).

A runner has one life cycle: open the artifact → ask for logits, token ids, greedy tokens, timings →
close. Runners run inside a child process (see validate/score.py), one artifact at a time, so a
crashing runtime cannot take the pipeline down and each artifact's peak memory is its own.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import numpy as np

from siliconvert.progress import track


@dataclass(frozen=True)
class Latency:
    prefill_tps: float  # prompt tokens per second
    decode_tps: float  # generated tokens per second (one token per step, KV cache)
    ttft_ms: float  # prompt in → first new token out
    peak_rss_mb: float  # peak resident memory of the process that ran the artifact
    prefill_tokens: int
    decode_tokens: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Runner(ABC):
    """An artifact opened on its runtime."""

    runtime: str  # e.g. "mlx", "llama.cpp", "coreml", "mil-interpreter"
    device: str  # e.g. "CPU (mlx)", "Apple M2 GPU (Metal)", "CPU (emulated, not Core ML)"

    @abstractmethod
    def __init__(self, path: Path, options: dict) -> None: ...

    @abstractmethod
    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Full-vocabulary logits [len(tokens), vocab] (float32) for one window, no cache carried over."""

    def logits_many(self, windows: np.ndarray) -> np.ndarray:
        """Logits [windows, length, vocab] (float32) for windows [windows, length], each on its own.

        One window at a time by default; a runner that is faster taking all windows through each
        part of the model in turn overrides this.
        """
        return np.stack([self.logits(window) for window in track(windows, f"logits ({self.runtime})", len(windows))])

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The artifact's own tokenization of `text`, without BOS/special tokens added; special tokens written in
        the text are read as those tokens (as transformers does)."""

    @abstractmethod
    def start(self, prompt: np.ndarray) -> np.ndarray:
        """Begin a sequence: run the prompt through a fresh KV cache, return the last position's logits."""

    @abstractmethod
    def step(self, token: int) -> np.ndarray:
        """Feed one token through the KV cache, return its logits."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the runtime's resources."""

    def unmeasured(self) -> dict[str, str]:
        """Checks this runner cannot make here, each with the reason: "kv_cache" (tokens fed one at a time
        through the cache against the no-cache pass), "latency" (speeds and peak memory) and "router" (which
        experts a mixture of experts chose). The report shows them as not measured, never as passed. Empty
        by default: every check runs."""
        return {}

    def expert_choices(self) -> np.ndarray | None:
        """The experts each sparse layer's router chose for every token of the windows of the last
        `logits_many`: ids [windows, length, sparse layers (in layer order), experts per token], in any order
        within a token. None for a model without experts, or where the runtime cannot show them (then
        `unmeasured()["router"]` says why)."""
        return None

    # ---- shared behaviour built on the primitives above ----------------------------------------
    def cached_logits(self, prompt: np.ndarray, continuation: np.ndarray) -> np.ndarray:
        """Logits after the prompt and after each token of `continuation` fed one at a time through the KV
        cache (teacher-forced), from a fresh cache: [1 + len(continuation), vocab]. Row i is what a no-cache
        `logits(prompt + continuation)` gives at position len(prompt) - 1 + i."""
        return np.stack([self.start(prompt), *(self.step(int(token)) for token in continuation)])

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> list[int]:
        """Greedy continuation through the KV cache."""
        out = [int(np.argmax(self.start(prompt)))]
        while len(out) < new_tokens:
            out.append(int(np.argmax(self.step(out[-1]))))
        return out

    def latency(self, prompt: np.ndarray, decode_tokens: int, repeats: int = 3) -> tuple[float, float, float]:
        """Median (prefill tok/s, decode tok/s, time to first token in ms) after one warm-up run."""
        prefill, decode, ttft = [], [], []
        for run in range(repeats + 1):
            t0 = time.perf_counter()
            token = int(np.argmax(self.start(prompt)))
            t1 = time.perf_counter()
            for _ in range(decode_tokens):
                token = int(np.argmax(self.step(token)))
            t2 = time.perf_counter()
            if run:  # the first run warms caches and compiles kernels
                prefill.append(len(prompt) / (t1 - t0))
                decode.append(decode_tokens / (t2 - t1))
                ttft.append((t1 - t0) * 1000)
        return median(prefill), median(decode), median(ttft)
