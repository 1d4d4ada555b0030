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
