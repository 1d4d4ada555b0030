"""Reference logits: the source checkpoint run by transformers, cached on disk.

FP16 on CUDA or MPS; on CPU the weights are upcast to FP32 (FP16 matmuls on CPU are slow and no
more faithful). The report says which.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from siliconvert.checkpoint import Checkpoint
from siliconvert.progress import track
from siliconvert.validate.corpus import Windows


def reference_device() -> tuple[str, str, str]:
    """(torch device, dtype name, human device name)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "float16", f"{torch.cuda.get_device_name()} (CUDA)"
    if torch.backends.mps.is_available():
        return "mps", "float16", "Apple GPU (MPS)"
    return "cpu", "float32", f"CPU ({torch.get_num_threads()} threads)"


def reference_logits(checkpoint: Checkpoint, windows: Windows, cache_dir: Path) -> tuple[np.ndarray, dict]:
    """Logits [windows, context, vocab] (float32) and a description of how they were made."""
    cache = cache_dir / f"reference-{checkpoint.fingerprint()}-{windows.digest}"
    if (cache / "info.json").is_file():
        return np.load(cache / "logits.npy"), json.loads((cache / "info.json").read_text())

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # ours is enough
    device, dtype, device_name = reference_device()
    model = AutoModelForCausalLM.from_pretrained(
        str(checkpoint.path), dtype=getattr(torch, dtype), trust_remote_code=False
    ).to(device)
    model.eval()
    rows = []
    with torch.inference_mode():
        for window in track(windows.tokens, "reference logits (transformers)", total=len(windows.tokens)):
            out = model(torch.as_tensor(window[None], device=device)).logits[0]
            rows.append(out.float().cpu().numpy())
    logits = np.stack(rows)
    upcast = f" (upcast from {checkpoint.spec.source_dtype})" if dtype != checkpoint.spec.source_dtype else ""
    info = {
        "runtime": f"transformers {transformers.__version__} / torch {torch.__version__}",
        "device": device_name,
        "dtype": dtype + upcast,
    }
    _save_atomically(cache, logits, info)
    return logits, info


def _save_atomically(folder: Path, logits: np.ndarray, info: dict) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "logits.npy", logits)
    (tmp / "info.json").write_text(json.dumps(info, indent=2))
    if folder.exists():  # another run finished first; its result is equivalent
        shutil.rmtree(tmp)
        return
    tmp.rename(folder)
