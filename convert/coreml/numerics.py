"""FP16 range of the residual stream: a calibration through transformers' float32 forward, and the power of two
that keeps the stream inside fp16.

Gemma's residual stream in real checkpoints passes 65 504: in fp16 it would become inf on the device (and in
the MIL interpreter, which rounds as the device does). Every norm that reads the stream is an RMSNorm, which
is scale-invariant, so the whole stream can run at a scale s: the embedding × s (graph.py) and each branch's
output × s (folded into its last weight: folds.py). A power of two makes that exact; the final norm removes
it before the head. The scale is chosen from the stream's peak on a calibration text, with HEADROOM for
other texts and for the stream between a layer's two adds, which the calibration does not see.
"""

from __future__ import annotations

import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from siliconvert.checkpoint import Checkpoint
from siliconvert.errors import CheckpointError

FLOAT16_MAX = 65504.0
HEADROOM = 16.0  # the calibrated peak × this stays in fp16
CALIBRATION_TOKENS = 64


@dataclass(frozen=True)
class FP16Range:
    peak: float  # the largest |value| of the residual stream in the calibration forward
    scale: float  # the stream's scale: a power of two, 1 where the peak leaves room

    @classmethod
    @functools.cache
    def calibrate(cls, checkpoint: Checkpoint) -> FP16Range:
        """The stream's peak over a training-text window through transformers' own forward, layer by layer
        (siliconvert/streamed.py: one layer's weights in memory), and the scale it calls for. The forward runs in
        a child process, as the reference does: what it imports and allocates leaves with it, so the writer's
        own memory stays what streaming needs. Once per opened checkpoint: the Core ML and MLX writers, and
        each build of the re-plan loop, ask again (a 7B forward reads every weight)."""
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                peak = pool.submit(stream_peak, checkpoint).result()
            except BrokenProcessPool:
                raise CheckpointError("the fp16 range calibration (transformers) crashed; out of memory?",
                                      checkpoint.path) from None
        scale = 1.0
        while peak * scale * HEADROOM > FLOAT16_MAX:
            scale /= 2
        return cls(peak, scale)


def stream_peak(checkpoint: Checkpoint) -> float:
    """The largest |value| of the residual stream, between layers, in transformers' float32 forward of the
    first CALIBRATION_TOKENS tokens of the training text."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from siliconvert.streamed import CheckpointWeights, streamed_logits
    from siliconvert.textdata import training_text

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path), trust_remote_code=False)
    window = np.array(tokenizer.encode(training_text()[:20000], add_special_tokens=False)[:CALIBRATION_TOKENS])
    peaks: list[float] = []

    def record(hidden) -> None:
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        peaks.append(float(hidden.abs().max()))

    def watch_stream(model) -> None:
        for layer in model.model.layers:  # each layer's input and output
            layer.register_forward_pre_hook(lambda _, args, kwargs: record(args[0] if args else
                                                                            kwargs["hidden_states"]),
                                            with_kwargs=True)
            layer.register_forward_hook(lambda _, __, output: record(output))

    config = AutoConfig.from_pretrained(str(checkpoint.path), trust_remote_code=False)
    streamed_logits(config, CheckpointWeights(checkpoint), window[None], device="cpu", dtype=torch.float32,
                    label="fp16 range calibration (transformers)", prepare=watch_stream, keep_logits=False)
    return max(peaks)
