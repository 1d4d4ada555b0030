"""The streamed forward: a weightless skeleton, filled layer by layer from the checkpoint, each weight read once."""

from __future__ import annotations

import numpy as np
import torch

from siliconvert.checkpoint import Checkpoint
from siliconvert.streamed import CheckpointWeights, Stream, model_skeleton, streamed_forward, streamed_logits


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


class Recording(CheckpointWeights):
    """The checkpoint's weights, each read noted."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        super().__init__(checkpoint)
        self.read: list[str] = []

    def tensor(self, name):
        self.read.append(name)
        return super().tensor(name)


def test_streams_sharing_a_pass_read_each_weight_once_and_get_their_own_passes_results(random_llama):
    """Two streams of different windows, dtypes and hooks: each module read once for both, and each stream's logits
    and hooks' records those of a pass of its own, bit for bit."""
    from transformers import AutoConfig

    config, checkpoint = AutoConfig.from_pretrained(random_llama), Checkpoint.open(random_llama)
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 96, size=(2, 12)), rng.integers(0, 96, size=(3, 20))

    def hooked(inputs: list[torch.Tensor], windows_seen: list[int | None]) -> dict:
        """A stream's hook arguments: each decoder layer's inputs recorded, and the windows as they start."""
        return {"prepare": lambda model: [layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
                                          for layer in model.model.layers],
                "window_started": windows_seen.append}

    alone_inputs: dict[str, list] = {"first": [], "second": []}
    alone = [streamed_logits(config, CheckpointWeights(checkpoint), first, device="cpu", dtype=torch.float32,
                             label="test", **hooked(alone_inputs["first"], [])),
             streamed_logits(config, CheckpointWeights(checkpoint), second, device="cpu", dtype=torch.bfloat16,
                             label="test", **hooked(alone_inputs["second"], []))]
    weights = Recording(checkpoint)
    shared_inputs: dict[str, list] = {"first": [], "second": []}
    seen: list[int | None] = []
    streams = [Stream(first, "cpu", torch.float32, **hooked(shared_inputs["first"], seen)),
               Stream(second, "cpu", torch.bfloat16, **hooked(shared_inputs["second"], []))]
    shared = streamed_forward(config, weights, streams, label="test")
    # the tied-or-not head is read once too: this head is its own (lm_head)
    assert sorted(weights.read) == sorted(checkpoint.tensor_infos)
    for ours, theirs in zip(shared, alone, strict=True):
        assert ours.dtype == np.float32 and np.array_equal(ours, theirs)
    for name in ("first", "second"):
        assert len(shared_inputs[name]) == len(alone_inputs[name]) > 0
        assert all(torch.equal(a, b) for a, b in zip(shared_inputs[name], alone_inputs[name], strict=True))
    # each turn of a stream ends with None: another stream's windows run then
    assert seen[:3] == [0, 1, None] and seen.count(None) == 2 + config.num_hidden_layers


def test_a_float16_stream_that_overflows_is_dropped_and_the_others_go_on(random_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    source = shutil.copytree(random_llama, tmp_path / "huge")
    weights = load_file(source / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 1e7  # ~1e5: bf16 holds it
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    config, checkpoint = AutoConfig.from_pretrained(source), Checkpoint.open(source)
    windows = np.arange(24).reshape(2, 12) % 96
    half, full = Stream(windows, "cpu", torch.float16), Stream(windows, "cpu", torch.float32)
    overflowed, logits = streamed_forward(config, CheckpointWeights(checkpoint), [half, full], label="test")
    assert (half.overflowed, full.overflowed) == (0, None) and overflowed is None
    assert np.array_equal(logits, streamed_logits(config, CheckpointWeights(checkpoint), windows, device="cpu",
                                                  dtype=torch.float32, label="test"))


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
