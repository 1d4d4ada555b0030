"""The sensitivity estimate on small arrays: each tensor's options, their bytes and their weighted errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from siliconvert.gains import Q8_0, Q8_K
from siliconvert.quantize.gguf import TensorQuantizer
from siliconvert.quantize.sensitivity import (
    GGUF_INPUT_ROUNDING,
    ROLE_GAINS,
    Option,
    TensorCosts,
    error_of,
    gguf_costs,
    mlx_costs,
    mlx_option,
    mlx_option_name,
    relative_error,
    role_gain,
    shrink_share,
    weighed,
)


def test_relative_error_weighs_columns_by_importance():
    weight = np.ones((4, 2))
    approx = weight.copy()
    approx[:, 1] = 0  # the whole second column lost
    assert relative_error(weight, approx, None) == pytest.approx(0.5)
    assert relative_error(weight, approx, np.array([1.0, 0.0])) == 0  # a column no input reaches costs nothing
    assert relative_error(weight, approx, np.array([1.0, 3.0])) == pytest.approx(0.75)


def test_the_shrink_share_is_the_part_of_the_error_that_scales_the_weight():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 256))
    importance = rng.random(256) + 0.1
    assert shrink_share(weight, 0.9 * weight, importance) == pytest.approx(0.01)
    assert relative_error(weight, 0.9 * weight, importance) == pytest.approx(0.01)  # all of its r
    noisy = weight + 0.1 * rng.standard_normal(weight.shape)
    assert shrink_share(weight, noisy, importance) < 1e-4 < relative_error(weight, noisy, importance)
    both = 0.95 * weight + 0.1 * rng.standard_normal(weight.shape)
    assert shrink_share(weight, both, importance) == pytest.approx(0.0025, rel=0.1)


def test_a_measured_shrink_gain_weighs_the_shrink_share_and_the_noise_gain_the_rest():
    assert weighed(0.02, 0.001, gain=0.5, shrink_gain=None) == pytest.approx(0.01)  # a role gain: r as a whole
    assert weighed(0.02, 0.001, gain=0.5, shrink_gain=40.0) == pytest.approx(0.5 * 0.019 + 40 * 0.001)


def test_gguf_costs_weigh_a_2_bit_types_shrink_more_than_a_6_bit_ones(weight):
    """Q2_K shrinks a weight's values (its α² a larger part of its r than Q6_K's): a shrink gain raises its cost
    more, the reason 2- and 3-bit weights of a plan measured 4× their noise-only prediction."""
    quantizer = TensorQuantizer(threads=1)
    try:
        noise_only, with_shrink = (gguf_costs("w", weight, None, quantizer, 1.0, candidates=(QType.Q2_K, QType.Q6_K),
                                              shrink_gain=shrink) for shrink in (None, 100.0))
    finally:
        quantizer.close()
    raised = {a.kind: b.error / a.error for a, b in zip(noise_only.options, with_shrink.options, strict=True)}
    assert raised["Q2_K"] > raised["Q6_K"] >= 1


def test_roles_weigh_errors_by_their_path_to_the_logits():
    assert role_gain("attn_v") == ROLE_GAINS["attn"] and role_gain("ffn_down_exps") == ROLE_GAINS["ffn"]
    assert role_gain("output") > 10 * role_gain("attn_q")
    assert role_gain("token_embd", tied_head=True) == ROLE_GAINS["token_embd"] + ROLE_GAINS["output"]
    assert role_gain("ssm_in") == ROLE_GAINS["attn"]  # a layer role not measured: attention's


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 512)).astype(np.float32)


def test_gguf_costs_are_llama_cpp_bytes_and_fall_with_bits(weight):
    quantizer = TensorQuantizer(threads=1)
    try:
        costs = gguf_costs("blk.0.ffn_down.weight", weight, np.linspace(0.1, 2, 512, dtype=np.float32), quantizer)
    finally:
        quantizer.close()
    by_kind = {o.kind: o for o in costs.options}
    for kind, option in by_kind.items():
        block, size = gguf.GGML_QUANT_SIZES[QType[kind]]
        assert option.nbytes == weight.size // block * size
    k_quants = [by_kind[k].error for k in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    assert k_quants == sorted(k_quants, reverse=True)
    assert 1e-5 < by_kind["Q8_0"].error < by_kind["Q2_K"].error < 0.5
    assert costs.params == weight.size


def test_gguf_costs_add_the_kld_of_the_input_rounding_each_types_kernels_use(weight):
    """A K-quant's kernels round the input to Q8_K, a 32-block type's to Q8_0: each candidate pays its own."""
    quantizer = TensorQuantizer(threads=1)
    try:
        importance = np.ones(weight.shape[1], dtype=np.float32)  # every candidate: the i-quants too
        bare, floored = (gguf_costs("w", weight, importance, quantizer, 1.0, input_klds=floors)
                         for floors in (None, {Q8_0: 0.001, Q8_K: 0.004}))
    finally:
        quantizer.close()
    before = {option.kind: option.error for option in bare.options}
    added = {option.kind: option.error - before[option.kind] for option in floored.options}
    assert set(added) == {qtype.name for qtype in GGUF_INPUT_ROUNDING} | {"F16"}
    for kind, extra in added.items():
        expected = {Q8_0: 0.001, Q8_K: 0.004, None: 0.0}[GGUF_INPUT_ROUNDING.get(QType[kind])]  # F16: no int8 input
        assert extra == pytest.approx(expected, abs=1e-12), kind


def test_gguf_costs_leave_out_types_a_row_cannot_hold():
    quantizer = TensorQuantizer(threads=1)
    try:
        costs = gguf_costs("narrow", np.ones((8, 96), dtype=np.float32), None, quantizer)
    finally:
        quantizer.close()
    assert {o.kind for o in costs.options} == {"IQ4_NL", "MXFP4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                               "F16"}  # no 256-block


def test_gguf_costs_offer_the_low_i_quants_only_with_an_importance_matrix(weight):
    """llama.cpp makes IQ2_XXS, IQ2_S and IQ3_XXS only with an importance matrix (ggml aborts on IQ2_XXS without one):
    a tensor without one (an embedding table) is not offered them; with one, the i-quants' error falls with bits."""
    quantizer = TensorQuantizer(threads=1)
    try:
        bare = gguf_costs("token_embd.weight", weight, None, quantizer)
        weighed = gguf_costs("blk.0.ffn_up.weight", weight, np.linspace(0.1, 2, 512, dtype=np.float32), quantizer)
    finally:
        quantizer.close()
    assert {"IQ2_XXS", "IQ2_S", "IQ3_XXS"}.isdisjoint(o.kind for o in bare.options)
    assert {"IQ3_S", "IQ4_XS"} <= {o.kind for o in bare.options}
    by_kind = {o.kind: o.error for o in weighed.options}
    ladder = [by_kind[k] for k in ("IQ2_XXS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")]
    assert ladder == sorted(ladder, reverse=True)


def test_f16_is_an_option_of_a_row_no_block_fits():
    quantizer = TensorQuantizer(threads=1)
    try:
        costs = gguf_costs("odd", np.random.default_rng(0).standard_normal((8, 144), dtype=np.float32), None,
                           quantizer)
    finally:
        quantizer.close()
    (option,) = costs.options  # 144 = 4.5 × 32: no block of any quantized type
    assert option.kind == "F16" and option.nbytes == 8 * 144 * 2 and option.error < 1e-6


def test_mlx_costs_fall_with_bits_and_smaller_groups(weight):
    costs = mlx_costs("model.layers.0.mlp.down_proj", weight, None, scale_bytes=2)
    by_kind = {o.kind: o for o in costs.options}
    assert by_kind["4bit-g64"].nbytes == weight.size // 2 + 2 * 2 * weight.size // 64
    errors = [by_kind[f"{bits}bit-g64"].error for bits in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True)
    assert by_kind["4bit-g32"].error < by_kind["4bit-g64"].error < by_kind["4bit-g128"].error


def test_mlx_costs_offer_the_float_modes_at_their_bytes(weight):
    """mxfp4, nvfp4 and mxfp8 are candidates beside affine: an 8-bit scale per group of 32, 16 and 32, no bias."""
    by_kind = {o.kind: o for o in mlx_costs("model.layers.0.mlp.down_proj", weight, None, scale_bytes=2).options}
    assert by_kind["mxfp4"].nbytes == weight.size // 2 + weight.size // 32
    assert by_kind["nvfp4"].nbytes == weight.size // 2 + weight.size // 16
    assert by_kind["mxfp8"].nbytes == weight.size + weight.size // 32
    assert by_kind["mxfp8"].error < by_kind["nvfp4"].error < by_kind["3bit-g32"].error
    for kind in by_kind:
        assert mlx_option_name(*mlx_option(kind)) == kind


def test_error_of_sums_the_errors_of_the_kinds_chosen():
    costs = [TensorCosts("a", 10, (Option("Q4_K", 10, 0.2), Option("Q8_0", 20, 0.01))),
             TensorCosts("b", 10, (Option("Q4_K", 10, 0.3),))]
    assert error_of(costs, {"a": "Q8_0", "b": "Q4_K"}) == pytest.approx(0.31)
    with pytest.raises(ValueError, match="b is stored as Q8_0, not a measured candidate"):
        error_of(costs, {"a": "Q8_0", "b": "Q8_0"})
