"""Shared fixtures: checkpoints are built here, never downloaded, and built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import siliconvert.formats  # noqa: F401 - registers the formats a recipe names

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
