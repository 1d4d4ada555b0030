"""Config normalisation: one place, every key read or reported."""

import dataclasses
import warnings

import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from siliconvert.architectures import LLAMA_TRAITS, ConfigWarning, ModelSpec, registry
from siliconvert.architectures.base import yarn_attention_factor
from siliconvert.errors import CheckpointError, UnsupportedArchitectureError

BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "hidden_act": "silu",
}


def spec_of(**changes):
    config = {**BASE, **changes}
    return registry.for_config(config).spec(config)


def test_rope_theta_under_rope_parameters_transformers_5():
    spec = spec_of(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert spec.rope_theta == 500000.0 and spec.rope_scaling is None


def test_rope_theta_at_top_level_older_checkpoints():
    assert spec_of(rope_theta=1e6).rope_theta == 1e6
    assert spec_of().rope_theta == 10000.0


def test_llama3_scaling_from_either_place():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    new = spec_of(rope_parameters={**scaling, "rope_theta": 500000.0})
    old = spec_of(rope_theta=500000.0, rope_scaling={**scaling, "type": "llama3"} | {"rope_type": "llama3"})
    assert new.rope_scaling == scaling
    assert old.rope_scaling["factor"] == 8.0 and old.rope_theta == new.rope_theta


def test_disagreeing_thetas_warn_and_prefer_rope_parameters():
    with pytest.warns(ConfigWarning, match="disagrees"):
        spec = spec_of(rope_theta=1.0, rope_parameters={"rope_type": "default", "rope_theta": 2.0})
    assert spec.rope_theta == 2.0


def test_unknown_keys_are_reported_not_dropped():
    with pytest.warns(ConfigWarning, match="'frobnicate'"):
        spec_of(frobnicate=3)


def test_known_keys_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec_of(rope_theta=1e4, tie_word_embeddings=True, torch_dtype="bfloat16", use_cache=True)


def test_bookkeeping_keys_of_real_checkpoints_raise_no_warning():
    # Real configs carry token ids, their origin and generation defaults; none of them changes the forward.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec_of(unk_token_id=0, _model_name_or_path="org/model", bos_token_id=1, sep_token_id=2,
                temperature=0.7, top_p=0.9, max_length=2048, attention_dropout=0.0, pretraining_tp=1)


def test_a_key_that_could_change_the_function_still_warns():
    with pytest.warns(ConfigWarning, match="'attn_logit_scale'"):
        spec_of(attn_logit_scale=0.5, unk_token_id=0)


def test_defaults_and_derived_values():
    spec = spec_of(num_key_value_heads=None)
    assert spec.num_kv_heads == spec.num_heads == 4
    assert spec.head_dim == 16
    assert spec.tie_word_embeddings is False  # HF's default for Llama (mlx-lm assumes True)
    assert spec_of(head_dim=32).head_dim == 32


def test_qwen2_has_qkv_bias_without_saying_so_and_llama_bias_covers_output():
    qwen = {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 4096}
    spec = registry.for_config(qwen).spec(qwen)
    assert spec.qkv_bias and not spec.attn_output_bias
    assert spec.sliding_window is None  # only with use_sliding_window
    llama = spec_of(attention_bias=True)
    assert llama.qkv_bias and llama.attn_output_bias


def test_expected_tensors_follow_the_spec():
    family = registry.for_config(BASE)
    spec = family.spec(BASE)
    shapes = family.expected_tensors(spec)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (2 * 16, 64)
    assert shapes["lm_head.weight"] == (100, 64)
    tied = spec_of(tie_word_embeddings=True)
    assert "lm_head.weight" not in family.expected_tensors(tied)


def test_roles():
    family = registry.for_config(BASE)
    role = family.role_of("model.layers.11.mlp.down_proj.weight")
    assert (role.role, role.layer, role.kind) == ("ffn_down", 11, "weight")
    assert family.role_of("model.embed_tokens.weight").role == "token_embd"
    assert family.role_of("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert family.is_droppable("model.layers.0.self_attn.rotary_emb.inv_freq")


def test_llama_traits_are_the_specs_defaults():
    """One table of Llama's traits: ModelSpec's defaults are its values, and a Llama config departs from none."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    assert {name: defaults[name] for name in LLAMA_TRAITS} == LLAMA_TRAITS
    assert spec_of().traits() == {}
    assert spec_of(hidden_act="gelu_pytorch_tanh").traits() == {"activation": "gelu_tanh"}


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match=r"GPTNeoXForCausalLM.*supported: .*LlamaForCausalLM"):
        registry.for_config({**BASE, "architectures": ["GPTNeoXForCausalLM"]})


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size"])
def test_missing_required_field(key):
    config = {k: v for k, v in BASE.items() if k != key}
    with pytest.raises(CheckpointError, match=key):
        registry.for_config(config).spec(config)


def test_unsupported_activation_and_gqa_ratio():
    with pytest.raises(CheckpointError, match="gelu"):
        spec_of(hidden_act="gelu")
    with pytest.raises(CheckpointError, match="multiple"):
        spec_of(num_key_value_heads=3)


@pytest.mark.parametrize("scaling", [
    {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0},  # Ministral 3: transformers' factor is 1
    {"factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 4.0},  # transformers' default from the factor alone, which llama.cpp computes too
    {"factor": 4.0, "attention_factor": 1.25},
])
def test_yarn_attention_factor_is_transformers_own(scaling: dict) -> None:
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 64, **scaling}
    hf_config = LlamaConfig(vocab_size=64, hidden_size=64, num_attention_heads=2, max_position_embeddings=256,
                            rope_parameters=rope)
    _, expected = ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    assert yarn_attention_factor(rope) == pytest.approx(expected)
