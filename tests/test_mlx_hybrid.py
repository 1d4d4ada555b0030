"""MLX on a hybrid model (LFM2: gated short convolutions around attention): mlx-lm's own layout, opened by
mlx_lm.load unchanged, its conv kernels and norms kept in float while the projections around them are quantized
like any linear; one recipe end to end, its state check decoding through the conv states and the KV cache."""

import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from conftest import SILICONVERT, build_mlx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lfm2(family_model) -> Path:
    return family_model("lfm2")


def test_four_bit_folder_is_mlx_lms_layout(lfm2, tmp_path):
    """The conv kernel in mlx's axis order ([channels, kernel, 1], what mlx-lm's sanitize makes of torch's
    [channels, 1, kernel]) and float, as are the norms; in_proj and out_proj quantized at g64; the MLP's down
    projection, 288 wide (no multiple of 64), at g32; mlx-lm builds a conv state per conv layer."""
    from mlx_lm import load
    from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

    artifact = build_mlx(lfm2, tmp_path, bits=4, group_size=64)
    weights = mx.load(str(artifact.path / "model.safetensors"))
    conv = weights["model.layers.0.conv.conv.weight"]
    assert conv.shape == (128, 3, 1) and mx.issubdtype(conv.dtype, mx.floating)
    norms = [name for name in weights if "norm" in name]
    assert norms and all(mx.issubdtype(weights[name].dtype, mx.floating) for name in norms)
    assert not any(name.startswith("model.layers.1.conv.") for name in weights)  # layer 1 is attention
    quantization = json.loads((artifact.path / "config.json").read_text())["quantization"]
    assert quantization["group_size"] == 64 and quantization["bits"] == 4
    assert quantization["model.layers.0.feed_forward.w2"]["group_size"] == 32
    for projection in ("in_proj", "out_proj"):
        assert weights[f"model.layers.0.conv.{projection}.weight"].dtype == mx.uint32
        assert f"model.layers.0.conv.{projection}" not in quantization  # the default: 4 bits, g64
    model, _ = load(str(artifact.path))
    kinds = [type(cache) for cache in make_prompt_cache(model)]
    assert kinds == [ArraysCache, KVCache, ArraysCache, ArraysCache]


def test_one_recipe_converts_lfm2_to_mlx_and_passes_every_gate(lfm2, tmp_path):
    """`siliconvert recipe` on the small LFM2: MLX float16 and 4-bit, each run by mlx-lm against transformers'
    forward, their state check decoding through mlx-lm's conv states and KV cache, every gate passed."""
    recipe = {"name": "lfm2", "source": str(lfm2), "output": str(tmp_path / "out"),
              "targets": [{"format": "mlx", "bits": 16}, {"format": "mlx", "bits": 4}],
              "validate": {"tokens": 256, "context": 128, "latency": False,
                           "gates": {"max_mean_kld": 0.06, "min_same_top1": 0.85}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([SILICONVERT, "recipe", str(tmp_path / "recipe.yaml")], capture_output=True, text=True,
                            env={**os.environ, "SILICONVERT_QUIET": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["source_info"]["traits"]["short_conv"] == [0, 2, 3]
    artifacts = {artifact["quant"]: artifact for artifact in report["artifacts"]}
    assert set(artifacts) == {"fp16", "4bit-g64"}
    assert artifacts["fp16"]["metrics"]["mean_kld"] < 0.001  # measured 3e-7; 4-bit 0.0042, same top-1 92 %
    for artifact in artifacts.values():
        assert artifact["gates"]["passed"] and artifact["tokenizer"]["passed"]
        assert artifact["kv_cache"]["consistent"] is True and artifact["kv_cache"]["checked_tokens"] > 1
