"""siliconvert/padding.py and the writers that pad: a planned GGUF's and MLX's MLP widened to a multiple of 32 with
zero units, so that the down projection's rows fit the runtimes' blocks, computing what the checkpoint does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from siliconvert import padding


def test_only_a_width_no_block_fits_is_padded_and_its_importance_row_with_zeros():
    assert [padding.padded_width(w) for w in (200, 688, 224, 4096)] == [224, 704, None, None]
    row = np.arange(1, 201, dtype=np.float32)
    padded = padding.padded_columns(row, 224)
    assert padded.shape == (224,) and np.array_equal(padded[:200], row) and not padded[200:].any()
    experts = np.ones((4, 200), dtype=np.float32)  # a row per expert: not the padded tensor's
    assert padding.padded_columns(experts, 224) is experts and padding.padded_columns(None, 224) is None
    assert padding.why(200, 224, "mlx")["why"].startswith("the down projection's rows of 200 fill no block of 32")


def llama_of_width(intermediate_size: int, demo_model: Path, where: Path, family: str = "llama", **config):
    """A 2-layer tied checkpoint of `family` (a transformers model_type) whose MLP is `intermediate_size` wide, random,
    with the demo's SentencePiece tokenizer (one llama.cpp writes for every family here)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from siliconvert.checkpoint import Checkpoint

    torch.manual_seed(0)
    demo = Checkpoint.open(demo_model)
    settings = dict(vocab_size=demo.spec.vocab_size, hidden_size=64, intermediate_size=intermediate_size,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=1024, tie_word_embeddings=True) | config
    source = where / "source"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings))
    model.to(torch.bfloat16).save_pretrained(source)
    for file in demo.tokenizer_files():
        shutil.copy(file, source / file.name)
    return Checkpoint.open(source)


def written(writer) -> list:
    for info, array in writer.checkpoint.tensors():
        writer.add(info, array)
    return writer.finish()


@pytest.mark.parametrize("intermediate_size", [200, 688])
def test_a_row_no_block_fits_is_padded_in_planned_gguf_and_mlx(intermediate_size, demo_model, tmp_path):
    """Rows of 200 or 688 hold no 256-block and no 32-block. The planned GGUF and MLX pad the MLP to the next multiple
    of 32 (224, 704), so their down rows are planned among the quantized types, and say so."""
    import json

    import gguf
    from mlx_lm import load

    from siliconvert.convert.gguf import GGUFWriter
    from siliconvert.convert.mlx import MLXWriter
    from siliconvert.recipe import GGUFTarget, MLXTarget

    checkpoint = llama_of_width(intermediate_size, demo_model, tmp_path)
    padded = -(-intermediate_size // 32) * 32
    for writer in (GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["auto"], plan={"bits_per_weight": 5}),
                              tmp_path / "out", "m"),
                   MLXWriter(checkpoint, MLXTarget(format="mlx", bits="auto", plan={"bits_per_weight": 5}),
                             tmp_path / "out", "m")):
        (artifact,) = written(writer)
        assert artifact.path.exists() and writer.quant_plan.choices
        down = {writer.quant_plan.choices[name].kind for name in writer.quant_plan.choices if "down" in name}
        if isinstance(writer, GGUFWriter):
            assert down and "F16" not in down, down
            assert artifact.plan["padded_ffn"]["from"] == intermediate_size
            assert artifact.plan["padded_ffn"]["to"] == padded
            assert artifact.plan["bits_per_weight"] <= 5.0  # over the checkpoint's weights, not the padding's
            from siliconvert.validate.report import plan_lines
            entry = {"format": "gguf", "quant": "auto", "plan": artifact.plan, "metrics": {"mean_kld": 0.001}}
            assert f"- MLP padded from {intermediate_size} to {padded} units: " in "\n".join(plan_lines([entry]))
            reader = gguf.GGUFReader(artifact.path)
            assert reader.fields["llama.feed_forward_length"].parts[-1][0] == padded
            shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
            assert shapes["blk.0.ffn_down.weight"] == (64, padded) and shapes["blk.1.ffn_up.weight"] == (padded, 64)
        else:
            assert down and all("bit" in kind or kind.endswith("fp4") for kind in down), down
            assert artifact.plan["padded_ffn"]["to"] == padded
            config = json.loads((artifact.path / "config.json").read_text())
            assert config["intermediate_size"] == padded
            load(str(artifact.path))  # mlx-lm builds the padded MLP and loads it


@pytest.mark.parametrize(("family", "config"), [
    ("llama", {"mlp_bias": True}),  # gate and up biases padded too (zeros), down's bias is not
    ("gemma2", {"hidden_activation": "gelu_pytorch_tanh"}), ("olmo2", {})])
def test_a_padded_mlp_computes_what_the_checkpoint_does(family, config, demo_model, tmp_path, monkeypatch):
    """The planned GGUF's padding changes no logit, in every family with a gated MLP (SiLU or GELU gates; biases):
    planned with F16 its one candidate, the padded file and the F16 file give llama.cpp's same logits."""
    from functools import partial

    from gguf import GGMLQuantizationType as QType

    import siliconvert.convert.gguf as gguf_writer
    from siliconvert.convert.gguf import GGUFWriter
    from siliconvert.recipe import GGUFTarget
    from siliconvert.validate.runners.gguf import LlamaCppRunner

    monkeypatch.setattr(gguf_writer, "gguf_costs", partial(gguf_writer.gguf_costs, candidates=(QType.F16,)))
    checkpoint = llama_of_width(200, demo_model, tmp_path, family, **config)
    exact, f16 = written(GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["auto", "F16"],
                                                           plan={"max_mean_kld": 1e-12}), tmp_path / "out", "m"))
    assert exact.plan["padded_ffn"]["to"] == 224 and set(exact.plan["types"]) == {"F16"}

    def logits(path):
        runner = LlamaCppRunner(path, {})
        try:
            return runner.logits(list(range(3, 67)))
        finally:
            runner.close()

    reference = logits(f16.path)
    assert np.abs(logits(exact.path) - reference).max() <= 1e-3 * np.abs(reference).max()


def test_mlx_pads_an_mlp_only_where_the_padded_one_computes_the_same(demo_model, tmp_path, monkeypatch):
    """padded_mlp asks mlx-lm's model which modules the width widens and checks one padded MLP against the plain one;
    with the padding's zero rows made ones (added units that output something) it pads nothing."""
    import mlx.core as mx

    import siliconvert.convert.mlx as mlx_writer

    config = mlx_writer.mlx_config(llama_of_width(200, demo_model, tmp_path))
    padded = mlx_writer.padded_mlp(config, 200)
    assert padded.width == 224 and len(padded.rows) == 4 and len(padded.columns) == 2
    assert mlx_writer.padded_mlp(config, 224) is None  # rows that fit are not padded
    pad = mlx_writer.PaddedMLP.pad

    def ones_in_rows(self, name, array, fill=None):
        if name.rpartition(".")[0] not in self.rows:
            return pad(self, name, array, fill)
        added = mx.ones((self.width - array.shape[0], *array.shape[1:]), dtype=array.dtype)
        return mx.concatenate([array, added], axis=0)
    monkeypatch.setattr(mlx_writer.PaddedMLP, "pad", ones_in_rows)
    assert mlx_writer.padded_mlp(config, 200) is None
