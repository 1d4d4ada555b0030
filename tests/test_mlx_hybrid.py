"""MLX on a hybrid model (LFM2: gated short convolutions around attention): mlx-lm's own layout, opened by
mlx_lm.load unchanged, its conv kernels and norms kept in float while the projections around them are quantized
like any linear; one recipe end to end, its state check decoding through the conv states and the KV cache. The same
for the gated delta rule (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) and Mamba2 (Granite 4.0-H)."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_mlx, run_recipe

pytestmark = pytest.mark.slow

# one recipe per family: float16 and 4-bit, scored on 256 tokens with the MLX limits
FLOAT_AND_4BIT = [{"format": "mlx", "bits": 16}, {"format": "mlx", "bits": 4}]
VALIDATE = {"tokens": 256, "context": 128, "latency": False, "gates": {"max_mean_kld": 0.06, "min_same_top1": 0.85}}


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
    report = run_recipe(lfm2, tmp_path, "lfm2", targets=FLOAT_AND_4BIT, validate=VALIDATE)
    assert report["source_info"]["traits"]["short_conv"] == [0, 2, 3]
    artifacts = {artifact["quant"]: artifact for artifact in report["artifacts"]}
    assert set(artifacts) == {"fp16", "4bit-g64"}
    assert artifacts["fp16"]["metrics"]["mean_kld"] < 0.001  # measured 3e-7; 4-bit 0.0042, same top-1 92 %
    for artifact in artifacts.values():
        assert artifact["gates"]["passed"] and artifact["tokenizer"]["passed"]
        assert artifact["kv_cache"]["consistent"] is True and artifact["kv_cache"]["checked_tokens"] > 1


# ---- Qwen3.5, Qwen3.5-MoE and Qwen3-Next: the gated delta rule in mlx-lm's qwen3_5, qwen3_5_moe and qwen3_next ----

GATED_DELTA_CASES = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe", "qwen3_next": "qwen3_next"}


@pytest.mark.parametrize("case", list(GATED_DELTA_CASES))
def test_gated_delta_folder_is_mlx_lms_layout(family_model, case, tmp_path):
    """mlx-lm's own model file (qwen3_5 for the text-only checkpoint, which mlx-lm has no qwen3_5_text file for), its
    names (qwen3_5's under language_model.), the conv kernel in mlx's axis order and float, the norms stored as
    1 + w (the gated norm as w), dt_bias float, A_log float32 where the model file keeps it uncast; the projections
    4-bit, the routers and the shared expert's gate 8-bit; a conv and recurrent state per gated-delta layer."""
    from mlx_lm import load
    from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

    source = family_model(case)
    artifact = build_mlx(source, tmp_path, bits=4, group_size=64, dtype="float16")
    config = json.loads((artifact.path / "config.json").read_text())
    assert config["model_type"] == GATED_DELTA_CASES[case] and config["full_attention_interval"] == 4
    weights = mx.load(str(artifact.path / "model.safetensors"))
    prefix = "" if case == "qwen3_next" else "language_model."
    layer = f"{prefix}model.layers.0"
    assert weights[f"{layer}.linear_attn.conv1d.weight"].shape == (2 * 64 + 96, 4, 1)  # q, k, v channels; 4 taps
    assert weights[f"{layer}.linear_attn.conv1d.weight"].dtype == mx.float16
    assert weights[f"{layer}.linear_attn.dt_bias"].dtype == mx.float16
    assert weights[f"{layer}.linear_attn.A_log"].dtype == (mx.float16 if case == "qwen3_next" else mx.float32)
    original = _bf16_tensors(source / "model.safetensors")
    offsets = {"model.layers.0.input_layernorm.weight": 1.0, "model.norm.weight": 1.0,
               "model.layers.3.self_attn.q_norm.weight": 1.0, "model.layers.0.linear_attn.norm.weight": 0.0}
    for name, offset in offsets.items():
        np.testing.assert_allclose(np.array(weights[prefix + name].astype(mx.float32)), original[name] + offset,
                                   rtol=1e-3, atol=1e-3)
    quantization = config["quantization"]
    assert quantization["bits"] == 4 and quantization["group_size"] == 64
    fused = ("in_proj_qkvz", "in_proj_ba") if case == "qwen3_next" else ("in_proj_qkv", "in_proj_z", "in_proj_b")
    for projection in fused:
        assert weights[f"{layer}.linear_attn.{projection}.weight"].dtype == mx.uint32
    sparse = 1 if case == "qwen3_next" else 0  # Qwen3-Next's experts sit in layers 1 and 3
    if case != "qwen3_5_text":
        for gate in ("gate", "shared_expert_gate"):
            assert quantization[f"{prefix}model.layers.{sparse}.mlp.{gate}"]["bits"] == 8
    model, _ = load(str(artifact.path))
    kinds = [type(cache) for cache in make_prompt_cache(model)]
    assert kinds == [ArraysCache, ArraysCache, ArraysCache, KVCache]


def _bf16_tensors(path: Path) -> dict:
    """A bfloat16 safetensors file's arrays as float32 (numpy has no bfloat16)."""
    return {name: np.array(value.astype(mx.float32)) for name, value in mx.load(str(path)).items()}


@pytest.mark.parametrize("case", list(GATED_DELTA_CASES))
def test_one_recipe_converts_a_gated_delta_model_to_mlx_and_passes_every_gate(family_model, case, tmp_path):
    """`siliconvert recipe` on each small gated-delta model: MLX float16 and 4-bit, run by mlx-lm (the folder as
    mlx_lm.load opens it) against transformers' forward, the state check decoding through mlx-lm's conv and
    recurrent states and the attention layer's KV cache, every gate passed."""
    source = family_model(case)
    report = run_recipe(source, tmp_path, case, targets=FLOAT_AND_4BIT, validate=VALIDATE)
    assert report["source_info"]["traits"]["gated_delta"] == [0, 1, 2]
    artifacts = {artifact["quant"]: artifact for artifact in report["artifacts"]}
    assert set(artifacts) == {"fp16", "4bit-g64"}
    # measured: Qwen3.5 6e-7; Qwen3.5-MoE 4e-4 and Qwen3-Next 2e-5, where float16's rounding flips near-tied routers
    # (as in every MoE family here: their bound is 1e-3); in float32 the Qwen3.5-MoE folder is transformers' function
    # to KLD 3e-13
    assert artifacts["fp16"]["metrics"]["mean_kld"] < (1e-5 if case == "qwen3_5_text" else 1e-3)
    for artifact in artifacts.values():
        assert artifact["gates"]["passed"] and artifact["tokenizer"]["passed"]
        assert artifact["kv_cache"]["consistent"] is True and artifact["kv_cache"]["checked_tokens"] > 1


def test_wrapped_qwen3_5_converts_its_language_model(tmp_path):
    """The hub's layout (Qwen3_5ForConditionalGeneration: a vision tower, a multi-token-prediction head) gives the
    folder of its language model alone: the same arrays and config as the text-only checkpoint's."""
    from families import FAMILY_CASES, qwen3_5_multimodal

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["qwen3_5_text"]
    text = build_mlx(small_checkpoint(None, "qwen3_5_text", tokenizer, config=config), tmp_path / "text", bits=16)
    with pytest.warns(UserWarning, match="vision tower and the multi-token-prediction head"):
        wrapped = build_mlx(qwen3_5_multimodal(tmp_path / "hub"), tmp_path / "wrapped", bits=16)
    ours, theirs = (mx.load(str(artifact.path / "model.safetensors")) for artifact in (wrapped, text))
    assert sorted(ours) == sorted(theirs) and not any("visual" in name or "mtp" in name for name in ours)
    assert all(mx.array_equal(ours[name], theirs[name]) for name in ours)
    # but the transformers version the text-only checkpoint names (the wrapped one names it outside its text_config)
    configs = [json.loads((artifact.path / "config.json").read_text()) for artifact in (wrapped, text)]
    configs[1].pop("transformers_version")
    assert configs[0]["model_type"] == "qwen3_5" and configs[0] == configs[1]


# ---- Granite 4.0-H: Mamba2 around NoPE attention, experts beside a shared MLP, in mlx-lm's granitemoehybrid ----


@pytest.fixture(scope="module")
def granite_hybrid(family_model) -> Path:
    return family_model("granitemoehybrid")


def _strict_json(path: Path) -> dict:
    """config.json as a strict JSON reader (mlx-swift's) takes it: no Infinity or NaN."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is no JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_granite_hybrid_folder_is_mlx_lms_layout(granite_hybrid, tmp_path):
    """What mlx-lm's granitemoehybrid reads, from a transformers 5.25 checkpoint it refuses as saved (its Mamba2 layers
    named linear_attention, Δ's upper limit as {"__float__": "Infinity"}): the layers as mamba / attention, no rope
    (transformers' None, where mlx-lm's default rotates), Δ's limits finite; the conv kernel in mlx's axis order and
    float, as are A_log, D, dt_bias and the norms; in_proj and out_proj quantized, the routers at 8 bits; mlx-lm builds
    a conv and SSM state per Mamba2 layer, a KV cache for the attention layer."""
    from mlx_lm import load
    from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

    source_config = json.loads((granite_hybrid / "config.json").read_text())
    assert source_config["layer_types"][0] == "linear_attention" and isinstance(source_config["time_step_limit"][1],
                                                                               dict)
    artifact = build_mlx(granite_hybrid, tmp_path, bits=4, group_size=64)
    config = _strict_json(artifact.path / "config.json")
    assert config["model_type"] == "granitemoehybrid"
    assert config["layer_types"] == ["mamba", "attention", "mamba", "mamba"]
    assert config["position_embedding_type"] == "nope"
    assert config["time_step_limit"][0] == 0.0 and np.float32(config["time_step_limit"][1]) == np.finfo(np.float32).max
    sizes = (config["num_local_experts"], config["intermediate_size"], config["shared_intermediate_size"])
    assert sizes == (4, 96, 160)  # experts' width, the shared MLP's
    weights = mx.load(str(artifact.path / "model.safetensors"))
    mamba = "model.layers.0.mamba"
    assert weights[f"{mamba}.conv1d.weight"].shape == (256 + 2 * 16, 4, 1)  # x, B, C channels; 4 taps
    for name in ("conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight"):
        assert mx.issubdtype(weights[f"{mamba}.{name}"].dtype, mx.floating), name
    for projection in ("in_proj", "out_proj"):
        assert weights[f"{mamba}.{projection}.weight"].dtype == mx.uint32
    quantization = config["quantization"]
    assert quantization["bits"] == 4 and quantization["group_size"] == 64
    assert quantization["model.layers.0.block_sparse_moe.router.layer"]["bits"] == 8
    model, _ = load(str(artifact.path))
    assert model.model.layers[1].self_attn.rope is None
    caches = make_prompt_cache(model)
    assert [type(cache) for cache in caches] == [ArraysCache, KVCache, ArraysCache, ArraysCache]


def test_granite_hybrid_float_folder_is_transformers_function(granite_hybrid, tmp_path):
    """In float32, mlx-lm's run of the folder is transformers' forward to rounding (measured KLD 4e-14 over 254
    positions; float16 1.2e-7)."""
    from conftest import reference_logits_for
    from test_mlx import held_out_windows

    from siliconvert.validate.metrics import compare
    from siliconvert.validate.runners.mlx import MLXRunner

    windows = held_out_windows(granite_hybrid, count=1, length=128)
    reference = reference_logits_for(granite_hybrid, windows)
    artifact = build_mlx(granite_hybrid, tmp_path, bits=16, dtype="float32")
    logits = MLXRunner(artifact.path, {"engine": "mlx"}).logits(windows[0])
    vocab = reference.shape[-1]
    scores = compare(reference[0, :-1, :vocab], logits[:-1, :vocab], windows[0, 1:])[0]
    assert scores.mean_kld < 1e-9 and scores.same_top1 == 1.0, scores


def test_granite_hybrid_refusals_name_the_trait(granite_hybrid, tmp_path):
    """What mlx-lm's granitemoehybrid computes otherwise is refused by trait: a gated norm over groups (mlx-lm
    normalises the whole inner width), experts that replace the dense MLP (mlx-lm's run beside it); and the torch
    stand-in, which reads transformers' names, refuses the folder."""
    from dataclasses import replace

    from siliconvert.checkpoint import Checkpoint
    from siliconvert.convert.mlx_arch import MLXArch
    from siliconvert.errors import ArtifactError, CheckpointError
    from siliconvert.validate.runners.mlx import MLXRunner

    spec = Checkpoint.open(granite_hybrid).spec
    assert MLXArch(spec, granite_hybrid).config()["mamba_n_groups"] == 1
    with pytest.raises(CheckpointError, match=r"cannot honour the trait mamba2: .* each of its 2 groups"):
        MLXArch(replace(spec, mamba2=replace(spec.mamba2, groups=2)), granite_hybrid)
    with pytest.raises(CheckpointError, match="cannot honour the trait beside_dense"):
        MLXArch(replace(spec, experts=replace(spec.experts, beside_dense=False)), granite_hybrid)
    artifact = build_mlx(granite_hybrid, tmp_path, bits=16)
    with pytest.raises(ArtifactError, match="runs Mamba2 with its own names"):
        MLXRunner(artifact.path, {"engine": "torch"})


def test_granite_hybrid_without_experts_runs_its_shared_mlp_as_mlx_lms_dense_mlp(granite_hybrid):
    """With num_local_experts 0 mlx-lm's granitemoehybrid runs a dense `mlp` (gate_proj, up_proj, down_proj) where
    transformers runs shared_mlp alone: the config says no experts, and the fused input_linear splits into the gate's
    rows, then the up's."""
    from dataclasses import replace
    from types import SimpleNamespace

    from siliconvert.architectures.base import TensorRole
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.convert.mlx import DenseMLPArrays
    from siliconvert.convert.mlx_arch import MLXArch

    spec = Checkpoint.open(granite_hybrid).spec
    dense = replace(spec, experts=None, layers=tuple(replace(layer, sparse=False) for layer in spec.layers))
    config = MLXArch(dense, granite_hybrid).config()
    assert config["num_local_experts"] == 0 and "shared_intermediate_size" not in config
    names = {"model.layers.2.shared_mlp.input_linear.weight": TensorRole("ffn_gate_up", 2, "weight"),
             "model.layers.2.shared_mlp.output_linear.weight": TensorRole("ffn_down", 2, "weight")}
    checkpoint = SimpleNamespace(spec=dense, tensor_infos={name: SimpleNamespace(role=role)
                                                            for name, role in names.items()})
    fused = mx.arange(2 * 160 * 3).reshape(2 * 160, 3)
    arrays = DenseMLPArrays(checkpoint, "mlp")({"model.layers.2.shared_mlp.input_linear.weight": fused})
    assert mx.array_equal(arrays["model.layers.2.mlp.gate_proj.weight"], fused[:160])
    assert mx.array_equal(arrays["model.layers.2.mlp.up_proj.weight"], fused[160:])
    down = DenseMLPArrays(checkpoint, "mlp")({"model.layers.2.shared_mlp.output_linear.weight": fused.T})
    assert list(down) == ["model.layers.2.mlp.down_proj.weight"]


def test_one_recipe_converts_granite_hybrid_to_mlx_and_passes_every_gate(granite_hybrid, tmp_path):
    """`siliconvert recipe` on the small Granite 4.0-H: MLX float16 and 4-bit, run by mlx-lm against transformers'
    forward, the state check decoding through mlx-lm's Mamba2 conv and SSM states and the NoPE attention layer's KV
    cache, every gate passed."""
    report = run_recipe(granite_hybrid, tmp_path, "granite-hybrid", targets=FLOAT_AND_4BIT, validate=VALIDATE)
    assert report["source_info"]["traits"]["mamba2"] == [0, 2, 3]
    artifacts = {artifact["quant"]: artifact for artifact in report["artifacts"]}
    assert set(artifacts) == {"fp16", "4bit-g64"}
    assert artifacts["fp16"]["metrics"]["mean_kld"] < 0.001
    for artifact in artifacts.values():
        assert artifact["gates"]["passed"] and artifact["tokenizer"]["passed"]
        assert artifact["kv_cache"]["consistent"] is True and artifact["kv_cache"]["checked_tokens"] > 1
    print("\nMEASURED", {quant: (a["metrics"]["mean_kld"], a["metrics"]["same_top1"], a.get("size_bytes"))
                         for quant, a in artifacts.items()})
