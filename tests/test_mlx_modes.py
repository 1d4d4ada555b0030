"""mx.quantize's float modes (mxfp4, nvfp4, mxfp8) are fixed MLX choices beside affine: mlx_lm.load opens each
folder (config.json's "quantization" carries the mode), the weights are mx.quantize's at the mode's bits and group
size, and mxfp8 costs less KLD than either 4-bit float mode."""

import json

import mlx.core as mx
import pytest
from conftest import build_mlx
from test_mlx_bits import mean_kld, reference  # noqa: F401 (a fixture)

from siliconvert.recipe import MLX_MODES, MLXTarget

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama(small_model):
    return small_model("llama", "sentencepiece", rope_theta=50000.0)


def test_each_mode_round_trips_and_more_bits_cost_less(llama, reference, tmp_path):  # noqa: F811
    klds = {}
    for mode, (bits, group_size) in MLX_MODES.items():
        artifact = build_mlx(llama, tmp_path / mode, mode=mode)
        assert artifact.path.name.endswith(f"-mlx-{mode}")
        config = json.loads((artifact.path / "config.json").read_text())
        assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": mode}
        weights = {}
        for shard in artifact.path.glob("model*.safetensors"):
            weights |= mx.load(str(shard))
        module = "model.layers.0.mlp.down_proj"
        packed, scales = weights[f"{module}.weight"], weights[f"{module}.scales"]
        assert f"{module}.biases" not in weights and scales.dtype == mx.uint8  # one 8-bit scale a group, no bias
        assert packed.shape[-1] * 32 == scales.shape[-1] * group_size * bits
        klds[mode] = mean_kld(artifact.path, reference)  # mlx_lm.load opens it
    assert klds["mxfp8"] < min(klds["mxfp4"], klds["nvfp4"])
    assert klds["nvfp4"] < 0.2  # a 4-bit model of the function, not noise


def test_a_mode_fixes_bits_and_group_size():
    assert MLXTarget(format="mlx", mode="mxfp8").bits_and_group == (8, 32)
    assert MLXTarget(format="mlx", mode="nvfp4", bits=4).quant == "nvfp4"
    assert MLXTarget(format="mlx", mode="mxfp4", dtype="bfloat16").quant == "mxfp4-bf16"
    for wrong in ({"bits": 8}, {"group_size": 64}, {"bits": "mixed_3_4"}, {"method": "gptq"}, {"method": "clip"}):
        with pytest.raises(ValueError, match="mode mxfp4"):
            MLXTarget(format="mlx", mode="mxfp4", **wrong)
    for method in ("gptq", "clip"):  # else two targets that differ only there would write one fp16 folder
        with pytest.raises(ValueError, match=f"method {method} rounds quantized weights; bits 16"):
            MLXTarget(format="mlx", bits=16, method=method)


def test_a_plan_mixes_modes_per_module(llama, reference, tmp_path, monkeypatch):  # noqa: F811
    """The planner's candidates include the float modes; a folder planned from them alone (every affine width
    taken away) stores each module in the mode chosen for it, under its own entry, and mlx_lm.load runs it."""
    from functools import partial

    import siliconvert.convert.mlx as mlx_writer
    from siliconvert.quantize.sensitivity import mlx_kinds

    monkeypatch.setattr(mlx_writer, "mlx_costs", partial(mlx_writer.mlx_costs, candidates=()))
    planned = build_mlx(llama, tmp_path / "planned", bits="auto", plan={"bits_per_weight": 6})
    kinds = mlx_kinds(planned.path)
    assert kinds == planned.plan["tensors"]
    assert {"mxfp8"} < set(kinds.values()) <= set(MLX_MODES)
    assert mean_kld(planned.path, reference) < 0.1
