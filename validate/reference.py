"""Reference logits: the source checkpoint run by transformers, layer by layer, cached on disk.

FP16 on CUDA or MPS; on CPU the weights are upcast to FP32 (FP16 matmuls on CPU are slow and no
more faithful). Where the residual stream leaves FP16's range (Gemma's does in real checkpoints), an FP16
reference would be wrong, not merely imprecise: the run notices the first non-finite layer output and
starts again in FP32. The report says which dtype ran, and why.

The model is never loaded whole: siliconvert/streamed.py holds one decoder layer's weights at a time, so a
7B reference fits in a few GB of memory. It runs in a child process, so the peak memory it reports is its
own; in a run that calibrates, in the calibration's child, as a stream of its pass (`ReferenceForward`): each layer
is read once for both, and the wall time and peak memory it reports are that shared pass's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from siliconvert.checkpoint import Checkpoint
from siliconvert.children import child_pool
from siliconvert.corpus import Windows
from siliconvert.errors import CheckpointError

if TYPE_CHECKING:
    from siliconvert.streamed import Stream


def reference_device() -> tuple[str, str, str]:
    """(torch device, dtype name, human device name)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "float16", f"{torch.cuda.get_device_name()} (CUDA)"
    if torch.backends.mps.is_available():
        return "mps", "float16", "Apple GPU (MPS)"
    return "cpu", "float32", f"CPU ({torch.get_num_threads()} threads)"


def reference_logits(checkpoint: Checkpoint, windows: Windows, cache_dir: Path) -> tuple[np.ndarray, dict]:
    """Logits [windows, context, vocab] (float32) and a description of how they were made.

    The description holds the child's peak resident memory (`peak_rss_mb`) and wall time (`wall_s`,
    imports included); `cached` is true when an earlier run made these logits.
    """
    cache = _cache_folder(checkpoint, windows, cache_dir)
    cached = (cache / "info.json").is_file()
    if not cached:
        with child_pool() as pool:
            try:
                pool.submit(_child, checkpoint, windows.tokens, cache).result()
            except BrokenProcessPool:
                raise CheckpointError("the reference run (transformers) crashed; out of memory?",
                                      checkpoint.path) from None
    # Read back from the cache, also after a fresh run: the child's copy of the logits is gone.
    info = json.loads((cache / "info.json").read_text()) | {"cached": cached}
    return np.load(cache / "logits.npy"), info


def reference_expert_choices(checkpoint: Checkpoint, windows: Windows, cache_dir: Path) -> np.ndarray | None:
    """The experts transformers' routers chose in the reference run (`reference_logits` first):
    ids [windows, context, sparse layers, k], or None for a model without experts."""
    file = _cache_folder(checkpoint, windows, cache_dir) / "router.npy"
    return np.load(file) if checkpoint.spec.experts is not None else None


def _cache_folder(checkpoint: Checkpoint, windows: Windows, cache_dir: Path) -> Path:
    return cache_dir / f"reference-{checkpoint.fingerprint()}-{windows.digest}"


def reference_forward(checkpoint: Checkpoint, windows: Windows, cache_dir: Path) -> ReferenceForward | None:
    """The reference's forward, to run in another streamed pass (the calibration's: each layer's weights read once
    for both), leaving its logits where `reference_logits` reads them; None where they are cached already."""
    cache = _cache_folder(checkpoint, windows, cache_dir)
    return None if (cache / "info.json").is_file() else ReferenceForward(checkpoint, windows.tokens, cache)


LABEL = "reference logits (transformers, layer by layer)"


class ReferenceForward:
    """The reference's forward over `tokens`, into the cache folder `cache`: alone in a pass of its own (`run`), or as
    a stream of another pass (siliconvert/streamed.py SharedForward: `stream`, the pass, then `finish`). It runs in a
    child process; its result is the same either way, bit for bit."""

    def __init__(self, checkpoint: Checkpoint, tokens: np.ndarray, cache: Path) -> None:
        self.checkpoint, self.tokens, self.cache = checkpoint, tokens, cache
        self.shared = True  # in another's pass, until `run` says otherwise
        self.started: float | None = None  # when the child began (`run`) or the stream was made

    def run(self) -> None:
        """The forward in a pass of its own."""
        from siliconvert.streamed import CheckpointWeights, streamed_forward

        self.started, self.shared = time.perf_counter(), False  # imports included, as the child's time
        stream = self.stream()
        self.finish(streamed_forward(self.checkpoint.transformers_config(), CheckpointWeights(self.checkpoint),
                                     [stream], label=LABEL)[0])

    def stream(self) -> Stream:
        """Its stream: the windows on the reference's device, in its dtype, the routers recorded (a mixture)."""
        import torch

        from siliconvert.streamed import Stream
        from siliconvert.validate.router import RouterRecorder

        self.started = self.started or time.perf_counter()
        self.device, self.dtype, self.device_name = reference_device()
        spec = self.checkpoint.spec
        self.routers = RouterRecorder(spec.sparse_layers, spec.experts.used) if spec.experts is not None else None
        self._stream = Stream(self.tokens, self.device, getattr(torch, self.dtype),
                              prepare=self.routers.attach if self.routers is not None else None)
        return self._stream

    def finish(self, logits: np.ndarray | None) -> None:
        """Save the stream's logits and routers' choices in the cache (a float16 stream that overflowed: run again
        alone, in float32)."""
        import torch
        import transformers

        from siliconvert.streamed import CheckpointWeights, streamed_logits, torch_path_kernels
        from siliconvert.validate.score import peak_rss_mb

        why, dtype = "", self.dtype
        if self._stream.overflowed is not None:  # a float16 reference would be wrong, not merely imprecise
            why = f"; float16 overflowed in decoder layer {self._stream.overflowed}"
            dtype = "float32"
            logits = streamed_logits(self.checkpoint.transformers_config(), CheckpointWeights(self.checkpoint),
                                     self.tokens, device=self.device, dtype=torch.float32, label=LABEL,
                                     prepare=self._stream.prepare)
        spec = self.checkpoint.spec
        choices = self.routers.choices(*self.tokens.shape) if self.routers is not None else None
        conversion = "upcast" if dtype == "float32" else "cast"
        converted = f" ({conversion} from {spec.source_dtype}{why})" if dtype != spec.source_dtype else ""
        method = "streamed: one decoder layer's weights in memory at a time"
        info = {
            "runtime": f"transformers {transformers.__version__} / torch {torch.__version__}",
            "device": self.device_name,
            "dtype": dtype + converted,
            # in the calibration's pass, its wall time and peak memory are that pass's
            "method": method + ("; in the calibration's pass (each layer read once for both)" if self.shared else ""),
            # hybrid mixers: the optional kernel packages not used (transformers' own PyTorch path ran instead)
            "without_kernels": torch_path_kernels({layer.mixer for layer in spec.layers}, self.device),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "wall_s": round(time.perf_counter() - self.started, 2),
        }
        if self.device == "cuda":
            info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        _save_atomically(self.cache, logits, choices, info)


def _child(checkpoint: Checkpoint, tokens: np.ndarray, cache: Path) -> None:
    ReferenceForward(checkpoint, tokens, cache).run()


def _save_atomically(folder: Path, logits: np.ndarray, choices: np.ndarray | None, info: dict) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "logits.npy", logits)
    if choices is not None:
        np.save(tmp / "router.npy", choices)
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    if folder.exists():  # another run finished first; its result is equivalent
        shutil.rmtree(tmp)
        return
    tmp.rename(folder)
