"""The streamed forward: a weightless skeleton, filled layer by layer from the checkpoint, each weight read once."""

from __future__ import annotations

import numpy as np
import torch

from siliconvert.checkpoint import Checkpoint
from siliconvert.streamed import CheckpointWeights, model_skeleton, streamed_logits


def test_only_the_weights_asked_for_are_read_and_every_one_once(random_llama):
    """Layer by layer: embedding, then each layer's tensors together, then the head; nothing twice."""
    from transformers import AutoConfig

    checkpoint = Checkpoint.open(random_llama)
    read: list[str] = []

    class Recording(CheckpointWeights):
        def tensor(self, name):
            read.append(name)
            return super().tensor(name)

    windows = np.arange(24).reshape(2, 12) % 96
    streamed_logits(AutoConfig.from_pretrained(random_llama), Recording(checkpoint), windows, device="cpu",
                    dtype=torch.float32, label="test")
    assert sorted(read) == sorted(checkpoint.tensor_infos)
    layers = [int(name.split(".")[2]) for name in read if name.startswith("model.layers.")]
    assert layers == sorted(layers)
    assert read[-1] == "lm_head.weight"


def test_skeleton_holds_no_weights(random_llama):
    from transformers import AutoConfig

    model = model_skeleton(AutoConfig.from_pretrained(random_llama), torch.float32)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())


def test_gemma4_per_layer_inputs_and_shared_keys_reach_each_layer(tmp_path):
    """Gemma 4's layers take a per-layer input (positional, each window its own) and its kv-shared layers read the keys
    and values earlier layers of the same window stored; its layer_scalar is a buffer the checkpoint holds. Windows of
    one length run together: a store shared between them would hand window 0 the keys of window 1."""
    import shutil
    import sys
    from pathlib import Path

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from families import FAMILY_CASES

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["gemma4_text"]
    source = shutil.copytree(small_checkpoint(None, "gemma4_text", tokenizer, config=config), tmp_path / "gemma4")
    weights = load_file(source / "model.safetensors")
    for layer in range(5):  # as real checkpoints have them: not 1
        weights[f"model.layers.{layer}.layer_scalar"] = torch.tensor([0.5 + 0.25 * layer], dtype=torch.bfloat16)
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    windows = np.random.default_rng(0).integers(0, 1000, size=(2, 40))
    streamed = streamed_logits(AutoConfig.from_pretrained(source), CheckpointWeights(Checkpoint.open(source)), windows,
                               device="cpu", dtype=torch.float32, label="test")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        whole = model(torch.as_tensor(windows)).logits.numpy()
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
