"""Every family maps its config onto traits, read from transformers' own config classes (no weights needed)."""

from __future__ import annotations

import math

import pytest
from families import FAMILY_CASES, GEMMA4_EXPERTS
from transformers import AutoConfig

from siliconvert.architectures import Experts, Layer, Rope, TensorRole, registry
from siliconvert.convert.gguf_arch import GGUFArch
from siliconvert.errors import CheckpointError

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM", "phi3": "Phi3ForCausalLM",
                 "smollm3": "SmolLM3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "olmo3": "Olmo3ForCausalLM", "lfm2": "Lfm2ForCausalLM", "qwen3_5_text": "Qwen3_5ForCausalLM",
                 "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
                 "granitemoehybrid": "GraniteMoeHybridForCausalLM", "ministral3": "Ministral3ForCausalLM",
                 "gemma4_text": "Gemma4ForCausalLM",
                 "gpt_oss": "GptOssForCausalLM"}
SIZES = {"vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 384, "max_position_embeddings": 1024}


def config_of(model_type: str, **changes) -> dict:
    """config.json as transformers 5 saves it for the family's test case (plus `changes`)."""
    settings = SIZES | FAMILY_CASES[model_type][1] | changes
    config = AutoConfig.for_model(model_type, **settings).to_dict()
    return config | {"architectures": [ARCHITECTURES[model_type]]}


def spec_of(model_type: str, **changes):
    config = config_of(model_type, **changes)
    return registry.for_config(config).spec(config)


def test_qwen3_head_dim_and_per_head_qk_norm() -> None:
    spec = spec_of("qwen3")
    assert spec.head_dim == 48 and spec.q_size == 192 != spec.hidden_size
    assert spec.traits() == {"qk_norm": "head"}


def test_gemma2_traits() -> None:
    spec = spec_of("gemma2")
    assert spec.norm_offset == 1.0 and spec.norm_placement == "sandwich" and spec.activation == "gelu_tanh"
    assert spec.embedding_scale == math.sqrt(128) and spec.attention_multiplier == 24**-0.5
    assert (spec.attn_softcap, spec.final_softcap) == (50.0, 30.0)
    assert [layer.window for layer in spec.layers] == [24, None, 24]


def test_gemma3_rope_per_layer_type() -> None:
    spec = spec_of("gemma3_text")
    local, full = Rope(10_000.0, 32), Rope(1_000_000.0, 32, {"rope_type": "linear", "factor": 2.0})
    assert spec.layers == (Layer(24, local), Layer(None, full), Layer(24, local))
    assert spec.rope == full and spec.rope_theta == 1_000_000.0
    assert spec.qk_norm == "head" and spec.traits()["per_layer_rope"]


def test_gemma3_default_pattern_and_thetas_from_transformers() -> None:
    """A config that leaves layer types and rope out gets transformers' defaults: 5 local layers, 1 global."""
    config = config_of("gemma3_text", num_hidden_layers=6, layer_types=None, rope_parameters=None)
    spec = registry.for_config(config).spec(config)
    assert [layer.window is None for layer in spec.layers] == [False] * 5 + [True]
    assert {layer.rope.theta for layer in spec.layers} == {10_000.0, 1_000_000.0}


def test_olmo2_post_norms_and_projection_qk_norm() -> None:
    config = config_of("olmo2")
    family = registry.for_config(config)
    spec = family.spec(config)
    assert spec.norm_placement == "post" and spec.qk_norm == "projection"
    expected = family.expected_tensors(spec)
    assert expected["model.layers.0.self_attn.q_norm.weight"] == (spec.q_size,)
    assert not any("input_layernorm" in name for name in expected)


def test_olmo3_is_olmo2_with_sliding_layers_and_a_rope_per_layer_type() -> None:
    """transformers' default layer types (three sliding, one full); YaRN on the full layer only. mlx-lm's olmo3 and
    llama.cpp's olmo2 both rotate the sliding layers with the main θ: a sliding θ of its own is refused by each."""
    from siliconvert.convert.mlx_arch import MLXArch

    spec = spec_of("olmo3")
    plain, yarn = Rope(500_000.0, 32), Rope(500_000.0, 32, {"rope_type": "yarn", "factor": 2.0,
                                                            "original_max_position_embeddings": 512})
    assert spec.layers == (Layer(24, plain), Layer(24, plain), Layer(24, plain), Layer(None, yarn))
    assert spec.norm_placement == "post" and spec.qk_norm == "projection" and spec.rope_scaling == yarn.scaling
    config = MLXArch(spec, "config.json").config()
    assert config["rope_theta"] == 500_000.0 and config["rope_scaling"]["type"] == "yarn"
    assert config["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"] and config["sliding_window"] == 24
    GGUFArch(spec, "config.json")
    own_theta = spec_of("olmo3", rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    for arch in (GGUFArch, MLXArch):
        with pytest.raises(CheckpointError, match="cannot honour the trait per_layer_rope"):
            arch(own_theta, "config.json")
    with pytest.raises(CheckpointError, match=r"MLX .* trait sliding_window: mlx-lm's model file needs a sliding"):
        MLXArch(spec_of("olmo3", sliding_window=4096, rope_parameters=None), "config.json")


def test_granite_multipliers() -> None:
    spec = spec_of("granite")
    assert (spec.embedding_scale, spec.attention_multiplier, spec.residual_scale, spec.logits_scale) == (
        6.0, 0.05, 0.5, 0.25)


def test_phi3_fused_tensors_partial_rotary_longrope() -> None:
    config = config_of("phi3")
    family = registry.for_config(config)
    spec = family.spec(config)
    assert spec.fused_qkv and spec.fused_gate_up
    expected = family.expected_tensors(spec)
    assert expected["model.layers.0.self_attn.qkv_proj.weight"] == (spec.q_size + 2 * spec.kv_size, 128)
    assert expected["model.layers.0.mlp.gate_up_proj.weight"] == (2 * 384, 128)
    assert spec.rope.dim == 16 and spec.rope.kind == "longrope" and spec.rope.scaling["factor"] == 4.0


def test_smollm3_nope_layers() -> None:
    spec = spec_of("smollm3")
    assert [layer.rope is None for layer in spec.layers] == [False, False, False, True]


def test_older_config_style_reads_the_same() -> None:
    """Top-level rope_theta / rope_scaling (before transformers 5) give the spec rope_parameters give."""
    new = spec_of("phi3")
    config = config_of("phi3")
    scaling = dict(config.pop("rope_parameters"))
    config |= {"rope_theta": scaling.pop("rope_theta"), "partial_rotary_factor": scaling.pop("partial_rotary_factor"),
               "rope_scaling": scaling | {"type": scaling.pop("rope_type")}}
    old = registry.for_config(config).spec(config)
    assert old.layers == new.layers


# families whose GGUF layout has not landed yet: the writer refuses them, naming the family
NO_GGUF_LAYOUT_YET: tuple[str, ...] = ()
# cases of a family with a layout whose shapes its llama.cpp graph cannot run: refused naming the trait (Qwen3.5's value
# heads narrower than its key heads; Qwen3-Next's experts not renormalised), never the family
GGUF_REFUSES_THE_TRAIT = {"qwen3_5_text": "gated_delta", "qwen3_5_moe_text": "gated_delta",
                          "qwen3_next": "normalize_topk"}


@pytest.mark.parametrize("model_type", [
    pytest.param(model_type, marks=pytest.mark.xfail(raises=CheckpointError, strict=True))
    if model_type in NO_GGUF_LAYOUT_YET else model_type for model_type in FAMILY_CASES])
def test_every_family_has_a_gguf_layout(model_type: str) -> None:
    if model_type in GGUF_REFUSES_THE_TRAIT:
        with pytest.raises(CheckpointError, match=f"trait {GGUF_REFUSES_THE_TRAIT[model_type]}"):
            GGUFArch(spec_of(model_type), "config.json")
        return
    GGUFArch(spec_of(model_type), "config.json")


@pytest.mark.parametrize(("model_type", "changes", "trait"), [
    ("smollm3", {"no_rope_layer_interval": 2}, "nope_layers"),
    ("gemma3_text", {"attn_logit_softcapping": 20.0}, "attn_softcap"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"], "use_sliding_window": True,
               "sliding_window": 8, "max_window_layers": 0,
               "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "per_layer_rope"),
    # llama.cpp's gpt-oss computes the clamped SwiGLU at gpt-oss's own constants only
    ("gpt_oss", {"swiglu_limit": 5.0}, "clamped_swiglu"),
    # llama.cpp's granitehybrid: an inner size of 2 × hidden, a conv bias, no projection biases, no time step clamp
    ("granitemoehybrid", {"mamba_expand": 1, "mamba_d_head": 16}, "mamba2"),
    ("granitemoehybrid", {"mamba_conv_bias": False}, "mamba2"),
    ("granitemoehybrid", {"mamba_proj_bias": True}, "mamba2"),
    ("granitemoehybrid", {"time_step_limit": [0.001, 0.1]}, "mamba2"),
    # llama.cpp's gemma4 reuses layer n − 2 for a sliding layer, n − 1 for a global one (n: the first kv-shared layer);
    # transformers the last earlier layer of the kind, here layer 2 (sliding) and layer 1 (global)
    ("gemma4_text", {"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                                     "full_attention"]}, "kv_shared_layers"),
])
def test_gguf_refuses_what_llama_cpp_cannot_compute(model_type: str, changes: dict, trait: str) -> None:
    with pytest.raises(CheckpointError, match=f"cannot honour the trait {trait}"):
        GGUFArch(spec_of(model_type, **changes), "config.json")


@pytest.mark.parametrize("trait", ["router_norm", "expert_scales", "branch_norms"])
def test_gemma4_expert_block_traits_are_refused_where_a_graph_lacks_them(trait: str) -> None:
    """Only llama.cpp's gemma4 graph runs Gemma 4's router and branch norms: another MoE graph refuses each by name,
    and the gemma4 graph refuses an expert block without them."""
    import dataclasses

    qwen3_moe = spec_of("qwen3_moe")
    with pytest.raises(CheckpointError, match=f"cannot honour the trait {trait}"):
        GGUFArch(dataclasses.replace(qwen3_moe, experts=dataclasses.replace(qwen3_moe.experts, **{trait: True})),
                 "config.json")
    gemma4 = spec_of("gemma4_text", **GEMMA4_EXPERTS)
    assert GGUFArch(gemma4, "config.json").arch.name == "GEMMA4"
    with pytest.raises(CheckpointError, match=f"cannot honour the trait {trait}"):
        GGUFArch(dataclasses.replace(gemma4, experts=dataclasses.replace(gemma4.experts, **{trait: False})),
                 "config.json")


def test_gguf_refuses_a_position_attention_scale_its_graph_does_not_read() -> None:
    """Llama 4's temperature is a trait: only a layout whose graph reads it (mistral3) takes it, never llama's."""
    import dataclasses

    spec = dataclasses.replace(spec_of("ministral3"), family="mistral")  # the llama graph
    with pytest.raises(CheckpointError, match="cannot honour the trait position_attention_scale"):
        GGUFArch(spec, "config.json")
    assert GGUFArch(spec_of("ministral3"), "config.json").arch.name == "MISTRAL3"


def test_gguf_folds_an_attention_scale_llama_cpp_does_not_read() -> None:
    """Gemma's q·k scale is query_pre_attn_scalar^-½; llama.cpp uses head_dim^-½ below 27B: the ratio goes into
    q's rows (Gemma 2) or, after a q norm that would undo it, into the norm's weights (Gemma 3)."""
    assert GGUFArch(spec_of("gemma2"), "c").q_scale == pytest.approx(math.sqrt(32 / 24))
    assert GGUFArch(spec_of("gemma3_text"), "c").q_scale == pytest.approx(math.sqrt(32 / 40))
    assert GGUFArch(spec_of("qwen3"), "c").q_scale == 1.0


def test_gguf_yarn_without_an_original_context_takes_the_models_own() -> None:
    """transformers reads a missing original_max_position_embeddings as max_position_embeddings: so does the
    GGUF's yarn key (it was a KeyError)."""
    import gguf

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SIZES,
              "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}}
    spec = registry.for_config(config).spec(config)
    writer = gguf.GGUFWriter(None, "llama")
    GGUFArch(spec, "config.json").add_hyperparameters(writer)
    assert writer.kv_data[0]["llama.rope.scaling.original_context_length"].value == 1024


def test_lfm2_short_conv_layers_around_attention() -> None:
    """LFM2: the mixer is a trait of each layer; conv layers hold no attention tensors, attention layers no conv
    ones; the MLP's width is transformers' derived one; the state per sequence is hidden × (kernel − 1) per layer."""
    spec = spec_of("lfm2")
    assert [layer.mixer for layer in spec.layers] == ["short_conv", "attention", "short_conv", "short_conv"]
    assert spec.traits() == {"qk_norm": "head", "short_conv": [0, 2, 3]}
    assert spec.intermediate_size == 288 and spec.short_conv.kernel == 3 and spec.tie_word_embeddings
    assert spec.state_numbers() == {"short_conv": 3 * 128 * 2}
    family = registry.for_config(config_of("lfm2"))
    expected = family.expected_tensors(spec)
    assert expected["model.layers.0.conv.conv.weight"] == (128, 1, 3)
    assert expected["model.layers.0.conv.in_proj.weight"] == (384, 128)
    assert "model.layers.0.self_attn.q_proj.weight" not in expected
    assert "model.layers.1.conv.in_proj.weight" not in expected
    assert expected["model.layers.1.self_attn.q_layernorm.weight"] == (32,)
    assert expected["model.layers.3.feed_forward.w2.weight"] == (128, 288)
    assert "model.embedding_norm.weight" in expected and "lm_head.weight" not in expected
    biased = family.expected_tensors(spec_of("lfm2", conv_bias=True))
    assert biased["model.layers.0.conv.conv.bias"] == (128,)


def test_lfm2_reads_liquids_own_config_style() -> None:
    """The hub's LFM2 configs: attention layers by `full_attn_idxs`, the MLP by `block_ff_dim`, sizes repeated
    under Liquid's names (checked, not read), `tie_embedding`."""
    liquid = {"architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2", "vocab_size": 1024, "hidden_size": 128,
              "block_dim": 128, "conv_dim": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_heads": 4,
              "num_key_value_heads": 2, "block_ff_dim": 384, "intermediate_size": 384, "full_attn_idxs": [2],
              "block_auto_adjust_ff_dim": False, "tie_embedding": False, "norm_eps": 1e-5, "theta": 1e6,
              "rope_theta": 1e6, "conv_L_cache": 3, "use_pos_enc": True, "block_use_swiglu": True}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = registry.for_config(liquid).spec(liquid)
    assert [layer.mixer for layer in spec.layers] == ["short_conv", "short_conv", "attention"]
    assert spec.intermediate_size == 384 and not spec.tie_word_embeddings and spec.rope_theta == 1e6
    with pytest.raises(CheckpointError, match="block_dim is 96 but hidden_size is 128"):
        registry.for_config(liquid).spec(liquid | {"block_dim": 96})
    with pytest.raises(CheckpointError, match=r"layer type '\w+' is not supported"):
        spec_of("lfm2", layer_types=["conv", "mamba", "conv", "conv"])


def test_qwen3_5_gated_delta_layers_and_gated_attention() -> None:
    """Qwen3.5: the gated delta rule in three of four layers, with its state's shapes; attention's q_proj emits
    query and gate; (1 + w) norms except the rule's own output norm; partial rotary."""
    spec = spec_of("qwen3_5_text")
    assert [layer.mixer for layer in spec.layers] == ["gated_delta"] * 3 + ["attention"]
    delta = spec.gated_delta
    assert (delta.key_heads, delta.value_heads, delta.key_head_dim, delta.value_head_dim) == (2, 4, 32, 24)
    assert delta.conv_channels == 2 * 64 + 96
    assert delta.state_shapes() == {"conv": (224, 3), "recurrent": (4, 32, 24)}
    assert spec.state_numbers() == {"gated_delta": 3 * (224 * 3 + 4 * 32 * 24)}
    assert spec.traits() == {"norm_offset": 1.0, "qk_norm": "head", "attn_output_gate": True,
                             "gated_delta": [0, 1, 2], "partial_rotary": 8}
    assert spec.norm_offset_of("attn_norm") == 1.0 and spec.norm_offset_of("ssm_norm") == 0.0
    expected = registry.for_config(config_of("qwen3_5_text")).expected_tensors(spec)
    assert expected["model.layers.3.self_attn.q_proj.weight"] == (2 * 4 * 32, 128)
    assert expected["model.layers.0.linear_attn.conv1d.weight"] == (224, 1, 4)
    assert expected["model.layers.0.linear_attn.A_log"] == expected["model.layers.0.linear_attn.dt_bias"] == (4,)
    assert expected["model.layers.0.linear_attn.norm.weight"] == (24,)
    assert "model.layers.0.self_attn.q_proj.weight" not in expected
    assert "model.layers.3.linear_attn.in_proj_qkv.weight" not in expected


def test_qwen3_5_moe_and_qwen3_next() -> None:
    """Qwen3.5-MoE: experts and a shared expert in every layer, no dense MLP (no intermediate_size in its config);
    Qwen3-Next: the gated delta rule's projections fused, experts only where decoder_sparse_step says."""
    moe = spec_of("qwen3_5_moe_text")
    assert moe.intermediate_size == 0 and moe.sparse_layers == [0, 1, 2, 3]
    assert moe.experts.normalize_topk and moe.experts.shared_intermediate_size == 160
    saved = {key: value for key, value in config_of("qwen3_5_moe_text").items() if key != "intermediate_size"}
    assert registry.for_config(saved).spec(saved) == moe
    nxt = spec_of("qwen3_next")
    assert nxt.gated_delta.fused and nxt.sparse_layers == [1, 3] and not nxt.experts.normalize_topk
    expected = registry.for_config(config_of("qwen3_next")).expected_tensors(nxt)
    assert expected["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (2 * 64 + 2 * 96, 128)
    assert expected["model.layers.0.linear_attn.in_proj_ba.weight"] == (8, 128)
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" not in expected
    assert expected["model.layers.0.mlp.gate_proj.weight"] == (384, 128)
    assert expected["model.layers.1.mlp.experts.gate_up_proj"] == (4, 192, 128)


def test_granite_4_h_mamba2_layers_around_nope_attention() -> None:
    """Granite 4.0-H: Mamba2 in the "mamba" layers (as transformers ≥ 5.25 names them too), NoPE attention, μP
    multipliers, experts beside the shared MLP in every layer (its gate and up fused)."""
    spec = spec_of("granitemoehybrid")
    assert [layer.mixer for layer in spec.layers] == ["mamba2", "attention", "mamba2", "mamba2"]
    assert spec.layers[1].rope is None and spec.traits()["nope_layers"] == [1]
    mamba = spec.mamba2
    assert (mamba.heads, mamba.head_dim, mamba.groups, mamba.state_size) == (8, 32, 1, 16)
    assert mamba.conv_channels == 256 + 2 * 16 and mamba.time_step_limit == (0.0, math.inf)
    assert spec.state_numbers() == {"mamba2": 3 * (288 * 3 + 8 * 32 * 16)}
    assert spec.experts.beside_dense and spec.intermediate_size == 160 and spec.fused_gate_up
    expected = registry.for_config(config_of("granitemoehybrid")).expected_tensors(spec)
    assert expected["model.layers.0.mamba.in_proj.weight"] == (256 + 288 + 8, 128)
    assert expected["model.layers.0.mamba.conv1d.bias"] == (288,) and expected["model.layers.0.mamba.D"] == (8,)
    assert expected["model.layers.1.shared_mlp.input_linear.weight"] == (320, 128)
    assert expected["model.layers.1.block_sparse_moe.experts.gate_up_proj"] == (4, 192, 128)
    assert "model.layers.1.mamba.A_log" not in expected and "model.layers.0.self_attn.q_proj.weight" not in expected
    rope = spec_of("granitemoehybrid", position_embedding_type="rope")
    assert rope.layers[1].rope is not None and rope.layers[0].rope is None and "nope_layers" not in rope.traits()


@pytest.mark.parametrize(("architecture", "model_type", "trait"), [
    ("NemotronHForCausalLM", "nemotron_h", "single_block_layers"),
    ("FalconH1ForCausalLM", "falcon_h1", "parallel_mixers")])
def test_hybrids_no_writer_runs_are_refused_naming_the_trait(architecture: str, model_type: str, trait: str) -> None:
    config = {"architectures": [architecture], "model_type": model_type, **SIZES}
    with pytest.raises(CheckpointError, match=f"no target honours the trait {trait}"):
        registry.for_config(config).spec(config)


def test_granite_4_h_without_experts_is_dense() -> None:
    """Granite 4.0-H Micro: num_local_experts 0 (and 0 per token): every layer's shared_mlp is its dense MLP."""
    spec = spec_of("granitemoehybrid", num_local_experts=0, num_experts_per_tok=0)
    assert spec.experts is None and spec.sparse_layers == [] and spec.intermediate_size == 160
    expected = registry.for_config(config_of("granitemoehybrid")).expected_tensors(spec)
    assert "model.layers.0.shared_mlp.input_linear.weight" in expected
    assert not any("block_sparse_moe" in name for name in expected)


def test_ministral3_yarn_and_llama4_attention_temperature() -> None:
    """Ministral 3: YaRN, and q × (1 + β·ln(1 + ⌊position / original⌋)) read as its own trait, not the rope's."""
    spec = spec_of("ministral3")
    assert spec.position_attention_scale == (0.1, 64)
    assert spec.rope.kind == "yarn" and "llama_4_scaling_beta" not in spec.rope.scaling
    assert spec.traits() == {"position_attention_scale": (0.1, 64), "rope_scaling": "yarn"}
    plain = spec_of("ministral3", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert plain.position_attention_scale is None


def test_gemma4_per_layer_sizes_kv_sharing_and_per_layer_inputs() -> None:
    spec = spec_of("gemma4_text")
    assert (spec.norm_offset, spec.norm_placement, spec.qk_norm, spec.value_norm) == (0.0, "sandwich", "head", True)
    assert spec.attention_multiplier == 1.0 and spec.embedding_scale == math.sqrt(128) and spec.final_softcap == 30.0
    assert (spec.per_layer_input, spec.per_layer_input_vocab, spec.layer_output_scale) == (16, 1024, True)
    sliding = Rope(10_000.0, 32)
    proportional = Rope(1_000_000.0, 64, {"rope_type": "proportional", "partial_rotary_factor": 0.25})
    assert spec.layers == (
        Layer(24, sliding), Layer(24, sliding),
        Layer(None, proportional, head_dim=64, kv_heads=1, values_from_keys=True),
        Layer(24, sliding, kv_source=1, intermediate_size=768),
        Layer(None, proportional, head_dim=64, kv_heads=1, values_from_keys=True, kv_source=2, intermediate_size=768))
    traits = spec.traits()
    assert traits["kv_shared_layers"] == {3: 1, 4: 2} and traits["k_eq_v"] == [2, 4]
    assert traits["per_layer_head_dim"] == {2: 64, 4: 64} and traits["rope_scaling"] == "proportional"
    assert "partial_rotary" not in traits  # proportional rope turns pairs across the whole head


def test_gemma4_checkpoint_tensors_follow_each_layer() -> None:
    family = registry.for_config(config_of("gemma4_text"))
    expected = family.expected_tensors(spec_of("gemma4_text"))
    assert expected["model.layers.2.self_attn.q_proj.weight"] == (256, 128)
    assert expected["model.layers.2.self_attn.k_proj.weight"] == (64, 128)
    assert "model.layers.2.self_attn.v_proj.weight" not in expected  # k_eq_v
    assert not any(name.startswith(("model.layers.3.self_attn.k", "model.layers.3.self_attn.v")) for name in expected)
    assert expected["model.layers.3.mlp.down_proj.weight"] == (128, 768)
    assert expected["model.embed_tokens_per_layer.weight"] == (1024, 80)
    assert expected["model.layers.0.layer_scalar"] == (1,)


def test_gemma4_expert_block_beside_the_dense_mlp() -> None:
    """26B-A4B's expert block: experts in every layer beside the dense MLP, the router's norm and scales and the
    branches' norms as traits, and the checkpoint's router, stacks and norms expected in every layer."""
    spec = spec_of("gemma4_text", **GEMMA4_EXPERTS)
    assert spec.experts == Experts(count=4, used=2, intermediate_size=64, normalize_topk=True, beside_dense=True,
                                   router_norm=True, expert_scales=True, branch_norms=True)
    assert spec.sparse_layers == [0, 1, 2, 3, 4]
    traits = spec.traits()
    assert traits["experts"] == "2 of 4"
    assert traits["router_norm"] and traits["expert_scales"] and traits["branch_norms"]
    expected = registry.for_config(config_of("gemma4_text", **GEMMA4_EXPERTS)).expected_tensors(spec)
    assert expected["model.layers.3.mlp.down_proj.weight"] == (128, 768)  # the dense MLP stays, double-wide
    assert expected["model.layers.3.router.proj.weight"] == (4, 128)
    assert expected["model.layers.3.router.scale"] == (128,)
    assert expected["model.layers.3.router.per_expert_scale"] == (4,)
    assert expected["model.layers.3.experts.gate_up_proj"] == (4, 128, 128)
    assert expected["model.layers.3.experts.down_proj"] == (4, 128, 64)
    for norm in ("post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"):
        assert expected[f"model.layers.0.{norm}.weight"] == (128,)
    assert "router_norm" not in spec_of("gemma4_text").traits() and spec_of("gemma4_text").experts is None


def test_gemma4_kv_shared_layers_own_kv_weights_are_dropped_said_so(tmp_path) -> None:
    """The hub's Gemma 4 checkpoints carry k_proj, v_proj and k_norm in the kv-shared layers too, which never run
    (transformers ignores them on loading): dropped with a warning that counts them, never an unexpected tensor."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from siliconvert.architectures import ConfigWarning
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["gemma4_text"]
    source = shutil.copytree(small_checkpoint(None, "gemma4_text", tokenizer, config=config), tmp_path / "gemma4")
    weights = load_file(source / "model.safetensors")
    for layer in (3, 4):  # the kv-shared ones: as wide as their producers' would be
        prefix = f"model.layers.{layer}.self_attn."
        weights |= {prefix + "k_proj.weight": torch.zeros(64, 128, dtype=torch.bfloat16),
                    prefix + "v_proj.weight": torch.zeros(64, 128, dtype=torch.bfloat16),
                    prefix + "k_norm.weight": torch.ones(32, dtype=torch.bfloat16)}
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(ConfigWarning, match=r"kv-shared layers' own k_proj, v_proj and k_norm \(6 tensors\)"):
        checkpoint = Checkpoint.open(source)
    assert not any(name.startswith("model.layers.3.self_attn.k") for name in checkpoint.tensor_infos)


def test_gpt_oss_sinks_windows_yarn_and_experts_with_biases() -> None:
    """gpt-oss: sinks, sliding and full layers alternating on one YaRN rope (its correction range untruncated, as
    gpt-oss-20b's config has it), q/k/v/o biases, experts with biases behind a router with a bias (top k, softmax
    over the chosen) and the clamped SwiGLU; its expert biases and sinks are tensors of their own roles."""
    spec = spec_of("gpt_oss")
    assert spec.attention_sinks and spec.qkv_bias and spec.attn_output_bias
    assert [layer.window for layer in spec.layers] == [24, None] and spec.layers[0].rope == spec.layers[1].rope
    assert spec.rope.kind == "yarn" and spec.rope.scaling["truncate"] is False
    assert spec.experts == Experts(count=4, used=2, intermediate_size=96, normalize_topk=True, biases=True,
                                   clamped_swiglu=(1.702, 7.0))
    assert spec.traits() == {"attention_sinks": True, "sliding_window": [0, 24], "rope_scaling": "yarn",
                             "experts": "2 of 4", "expert_biases": True, "clamped_swiglu": (1.702, 7.0),
                             "yarn_untruncated": True}
    family = registry.for_config(config_of("gpt_oss"))
    roles = {name: family.role_of(name) for name in (
        "model.layers.1.self_attn.sinks", "model.layers.1.mlp.router.bias", "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.gate_up_proj_bias", "model.layers.1.mlp.experts.down_proj_bias")}
    assert [(role.role, role.layer, role.kind) for role in roles.values()] == [
        ("attn_sinks", 1, "weight"), ("ffn_gate_inp", 1, "bias"), ("ffn_gate_up_exps", 1, "weight"),
        ("ffn_gate_up_exps", 1, "bias"), ("ffn_down_exps", 1, "bias")]
    qwen3_5 = registry.for_config(config_of("qwen3_5_text"))  # a bare `_bias` of no stack keeps its own role
    assert qwen3_5.role_of("model.layers.0.linear_attn.dt_bias") == TensorRole("ssm_dt", 0, "weight")
    expected = family.expected_tensors(spec)
    assert expected["model.layers.0.mlp.experts.gate_up_proj"] == (4, 192, 128)  # streamed: [experts, 2·ff, hidden]
    assert expected["model.layers.0.mlp.experts.gate_up_proj_bias"] == (4, 192)
    assert expected["model.layers.0.self_attn.sinks"] == (4,)


def test_untruncated_yarn_is_written_for_llama_cpp_with_a_warning_naming_the_trait() -> None:
    """llama.cpp always rounds YaRN's correction range out to whole dimensions: gpt-oss's untruncated range is
    written as llama.cpp's own converter writes it, and said (tests/test_gguf_moe.py measures what it costs)."""
    with pytest.warns(UserWarning, match="yarn_untruncated: llama.cpp rounds YaRN's correction range"):
        GGUFArch(spec_of("gpt_oss"), "config.json")


def test_writers_refuse_expert_biases_and_the_clamped_swiglu_they_do_not_compute() -> None:
    from dataclasses import replace

    mixtral = spec_of("mixtral")
    biased = replace(mixtral, experts=replace(mixtral.experts, biases=True))
    with pytest.raises(CheckpointError, match="cannot honour the trait expert_biases"):
        GGUFArch(biased, "config.json")
    clamped = replace(mixtral, experts=replace(mixtral.experts, clamped_swiglu=(1.702, 7.0)))
    with pytest.raises(CheckpointError, match="cannot honour the trait clamped_swiglu"):
        GGUFArch(clamped, "config.json")
    with pytest.raises(CheckpointError, match="cannot honour the trait attention_sinks"):
        GGUFArch(replace(mixtral, attention_sinks=True), "config.json")
