"""Shared fixtures: checkpoints are built here, never downloaded, and built once per session."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from releases import HUB_ID, MODEL, FakeCheckpoint, entry, write

import siliconvert.formats  # noqa: F401 - registers the formats a recipe names

# Under pytest-xdist (`make test`: a worker per core) each worker, and every process it starts, gets its share of
# the cores: torch's default of all of them per process has the workers' threads wait on each other. Set before
# torch is first imported (nothing above imports it), which is when torch reads it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# The `siliconvert` command as a user runs it: the console script pip installed beside this Python
SILICONVERT = str(Path(sys.executable).with_name("siliconvert"))


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory) -> Path:
    """A tiny random-weight Llama (bf16, transformers-5 config, a word-level tokenizer): for reader tests."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=20000.0, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("random-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0")).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The built-in demo checkpoint (cached under SILICONVERT_CACHE or ~/.cache/siliconvert)."""
    from siliconvert.demo import demo_checkpoint

    return demo_checkpoint()


@pytest.fixture(scope="session")
def small_model():
    """small_model(family, tokenizer) → a quickly trained small checkpoint (cached like the demo)."""
    from siliconvert.demo import small_checkpoint

    return lambda family="llama", tokenizer="sentencepiece", **overrides: small_checkpoint(
        None, family, tokenizer, **overrides)


@pytest.fixture(scope="session")
def family_model(small_model):
    """family_model(model_type) → the trained small checkpoint of tests/families.py's case for that family."""
    from families import FAMILY_CASES

    def source(family: str) -> Path:
        tokenizer, config = FAMILY_CASES[family]
        return small_model(family, tokenizer, config=config)
    return source


def reference_logits_for(checkpoint_path: Path, windows) -> np.ndarray:  # noqa: F821
    """Plain transformers FP32 logits for each window: the ground truth tests compare with."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint_path, dtype=torch.float32)
    with torch.inference_mode():
        return np.stack([model(torch.as_tensor(w[None])).logits[0].numpy() for w in windows])


def reference_choices_for(checkpoint_path: Path, windows) -> np.ndarray:  # noqa: F821
    """The experts transformers' routers choose (float32) for each window's tokens, recorded as the reference run
    records them: ids [windows, length, sparse layers, k]."""
    import torch

    from siliconvert.checkpoint import Checkpoint
    from siliconvert.streamed import CheckpointWeights, streamed_logits
    from siliconvert.validate.router import RouterRecorder

    checkpoint = Checkpoint.open(checkpoint_path)
    spec = checkpoint.spec
    recorder = RouterRecorder(spec.sparse_layers, spec.experts.used)
    streamed_logits(checkpoint.transformers_config(), CheckpointWeights(checkpoint), windows, device="cpu",
                    dtype=torch.float32, label="reference", prepare=recorder.attach, keep_logits=False)
    return recorder.choices(*windows.shape)


def build_mlx(source, out_dir, **target):
    """The MLX writer over a checkpoint's whole stream, as the pipeline runs it; returns the artifact."""
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.convert.mlx import MLXWriter
    from siliconvert.recipe import MLXTarget

    checkpoint = Checkpoint.open(source)
    writer = MLXWriter(checkpoint, MLXTarget(format="mlx", **target), out_dir, checkpoint.name)
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    (artifact,) = writer.finish()
    return artifact


@pytest.fixture
def build(tmp_path) -> tuple[dict, FakeCheckpoint, Path]:
    """A run's output folder: artifacts of every format, plot.png, and the report that scored them."""
    source = tmp_path / "hub-cache" / "snapshot"
    write(source / "README.md", "---\nlicense: apache-2.0\nlanguage: [en]\n---\n# Mistral\n")
    write(source / "tokenizer.json", '{"model": {"type": "BPE"}}')
    write(source / "tokenizer_config.json", "{}")
    out = tmp_path / "out"
    arts = out / "artifacts"
    for name in ("4bit-g64", "8bit-g64"):
        folder = arts / f"{MODEL}-mlx-{name}"
        write(folder / "config.json", '{"quantization": {"bits": 4, "group_size": 64}}')
        write(folder / "model.safetensors", b"\x00weights" * 100)
        write(folder / "model.safetensors.index.json", "{}")
        write(folder / "tokenizer.json", '{"model": {"type": "BPE"}}')
        write(folder / "README.md", "the artifact's own card")
    for quant in ("Q4_K_M", "Q8_0", "Q2_K"):
        write(arts / f"{MODEL}-{quant}.gguf", b"GGUF" + quant.encode() * 50)
    coreml = arts / f"{MODEL}-fp16-coreml"
    write(coreml / "chunk_01.mlpackage" / "Manifest.json", "{}")
    write(coreml / "chunk_01.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin", b"\x01" * 64)
    write(coreml / "manifest.json", json.dumps({
        "context_length": 2048, "functions": {"decode": 1, "prefill": 64},
        "chunks": [{"package": "chunk_01.mlpackage", "inputs": ["input_ids", "position"], "outputs": ["logits"],
                    "states": {"key_cache": [2, 8, 2048, 128], "value_cache": [2, 8, 2048, 128]}}]}))
    write(out / "plot.png", b"\x89PNG fake")
    report = {
        "schema": 1, "siliconvert": "0.1.0", "source": HUB_ID,
        "source_info": {"name": MODEL, "path": str(source), "architecture": "MistralForCausalLM",
                        "family": "mistral", "fingerprint": "abc", "dtype": "bfloat16"},
        "reference": {"runtime": "transformers 5.0 / torch 2.8", "device": "CPU", "dtype": "float32 (upcast)"},
        "corpus": {"name": "builtin", "tokens": 1024, "context": 256, "windows": 4, "positions": 1020},
        "artifacts": [
            entry("mlx", "4bit-g64", arts / f"{MODEL}-mlx-4bit-g64"),
            entry("mlx", "8bit-g64", arts / f"{MODEL}-mlx-8bit-g64", failed=("mean_kld", "same_top1")),
            entry("gguf", "Q4_K_M", arts / f"{MODEL}-Q4_K_M.gguf", mean_kld=0.02468),
            entry("gguf", "Q8_0", arts / f"{MODEL}-Q8_0.gguf", mean_kld=0.00135),
            entry("gguf", "Q2_K", arts / f"{MODEL}-Q2_K.gguf", failed=("mean_kld",)),
            entry("coreml", "fp16", coreml, mean_kld=0.00042),
        ],
        "passed": False,
    }
    return report, FakeCheckpoint(source), out


def run_recipe(source: Path, folder: Path, name: str, *, targets: list[dict], validate: dict) -> dict:
    """`siliconvert recipe` as a user runs it, on `source` with `targets` and `validate`, written to `folder`/out;
    it must exit 0. Returns report.json."""
    import subprocess

    import yaml

    recipe = {"name": name, "source": str(source), "output": str(folder / "out"), "targets": targets,
              "validate": validate}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([SILICONVERT, "recipe", str(folder / "recipe.yaml")], capture_output=True, text=True,
                            env={**__import__("os").environ, "SILICONVERT_QUIET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((folder / "out" / "report.json").read_text())
