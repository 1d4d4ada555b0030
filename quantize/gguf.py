"""GGUF quantization by llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python).

The quantizer reads a full-precision GGUF written by siliconvert.convert.gguf and writes one file per type,
choosing per tensor as llama-quantize does (Q4_K_M keeps some v/down projections at Q6_K, ...).

Importance matrix. llama-cpp-python can hand llama.cpp an importance matrix
(`llama_model_quantize_params.imatrix`) but cannot compute one: the `llama-imatrix` tool is not part of
its API. `importance_matrix` therefore computes the same statistic llama-imatrix collects, the mean of
x² of every input column entering each matrix multiply, over a calibration text, running the source
checkpoint in transformers (float32, CPU). This loads the whole model once, unlike the streamed
conversion. The calibration text "builtin" is siliconvert.textdata.training_text(): text the demo
models were trained on, never the held-out text validation scores, so calibration cannot flatter the
validation table.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
from gguf import LlamaFileType

from siliconvert.errors import ArtifactError, RecipeError, RuntimeMissingError

# Recipe type name → llama.cpp file type; llama.cpp picks each tensor's type from it.
LLAMA_CPP_QUANTS = {
    name: LlamaFileType[f"MOSTLY_{name}"]
    for name in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "Q4_0")
}
CALIBRATION_TOKENS = 8192  # llama-imatrix's usual order of magnitude for small models; a few minutes on 7B CPU
CALIBRATION_CONTEXT = 512  # llama-imatrix's default chunk length

# ggml_log_level values (ggml.h). llama-cpp-python's own logger still uses an older numbering (2 = warn).
LOG_WARN, LOG_ERROR, LOG_CONT = 3, 4, 5


def quantize(source: Path, dest: Path, quant: str, *, imatrix: dict[str, np.ndarray] | None = None,
             threads: int | None = None) -> Path:
    """Quantize the GGUF `source` to `quant` at `dest` (atomically: a temporary name, then a rename)."""
    llama_cpp = _llama_cpp()
    if quant not in LLAMA_CPP_QUANTS:
        raise RecipeError(f"llama.cpp quantization type {quant!r} is not one of {', '.join(LLAMA_CPP_QUANTS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or cpu_threads()
    params.ftype = LLAMA_CPP_QUANTS[quant]
    if imatrix:
        # A NULL-terminated array of (name, values, count); the numpy arrays must outlive the call.
        arrays = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in sorted(imatrix.items())}
        entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
        for entry, (name, values) in zip(entries, arrays.items(), strict=False):  # the last is NULL
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    temp = dest.with_name(f".{dest.name}.partial")
    with LlamaLog() as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(temp).encode(), ctypes.byref(params))
    if status != 0:
        temp.unlink(missing_ok=True)
        raise ArtifactError(f"llama.cpp could not quantize to {quant}: {log.last_error or 'no reason given'}",
                            source)
    os.replace(temp, dest)
    return dest


def calibration_text(source: str) -> tuple[str, str]:
    """(name, text) of the recipe's `imatrix` calibration text: "builtin" or a UTF-8 file."""
    if source == "builtin":
        from siliconvert.textdata import training_text

        return "builtin (siliconvert.textdata.training_text)", training_text()
    try:
        return source, Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read the imatrix calibration text ({e})", source) from None


def importance_matrix(checkpoint: Path, text: str, *, tokens: int = CALIBRATION_TOKENS,
                      context: int = CALIBRATION_CONTEXT, where: str = "calibration text") -> dict[str, np.ndarray]:
    """Mean x² per input column of every linear layer's input, keyed by the HF weight name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Tokens are rarely longer than 16 characters: tokenizing more text than that would be wasted.
    ids = AutoTokenizer.from_pretrained(checkpoint)(text[: tokens * 16], add_special_tokens=False)["input_ids"]
    ids = ids[:tokens]
    if len(ids) < context:
        raise RecipeError(f"{len(ids)} tokens are too few to calibrate an importance matrix (need {context})", where)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def record(name: str):
        def hook(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            rows[name] = rows.get(name, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(record(f"{name}.weight"))
    with torch.inference_mode():
        for start in range(0, len(ids) - context + 1, context):
            model(torch.tensor([ids[start:start + context]]))
    return {name: (sums[name] / rows[name]).float().numpy() for name in sorted(sums)}


class LlamaLog:
    """Collects llama.cpp's log while active, instead of llama-cpp-python's print to stderr."""

    def __enter__(self) -> LlamaLog:
        import llama_cpp

        self.lines: list[tuple[int, str]] = []
        self._callback = llama_cpp.llama_log_callback(self._record)  # kept referenced while installed
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *_exc: object) -> None:
        import llama_cpp
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))

    def _record(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace")
        if level == LOG_CONT and self.lines:
            self.lines[-1] = (self.lines[-1][0], self.lines[-1][1] + message)
        else:
            self.lines.append((level, message))

    @property
    def warnings(self) -> list[str]:
        """Warning and error lines, in order."""
        return [text.strip() for level, text in self.lines if level in (LOG_WARN, LOG_ERROR) and text.strip()]

    @property
    def last_error(self) -> str | None:
        errors = [text.strip() for level, text in self.lines if level == LOG_ERROR and text.strip()]
        return errors[-1] if errors else None


def cpu_threads() -> int:
    """Cores this process may use (sched_getaffinity where the OS has it, as Linux does; else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeMissingError("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
    return llama_cpp
