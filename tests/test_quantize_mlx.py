"""quantize/mlx.py's GPTQ share: what a plan with `method: gptq` scales a module's rounding errors by; and end to
end, the best MLX at <= 4.5 bits per weight (bits planned, rounded by GPTQ) against 4-bit rounding."""

import numpy as np
import pytest
from conftest import build_mlx
from test_quantize_gptq import correlated

from siliconvert.quantize.gptq import gptq_quantize
from siliconvert.quantize.mlx import gptq_error_shares, with_gptq_errors
from siliconvert.quantize.sensitivity import Option, TensorCosts


def test_gptq_leaves_less_of_the_error_where_the_inputs_correlate():
    weight, hessian = correlated()
    rng = np.random.default_rng(1)
    independent = rng.normal(size=(2048, hessian.shape[0])) * np.exp(rng.normal(size=hessian.shape[0]))
    correlated_share = gptq_error_shares(weight, hessian)["4bit-g64"]
    independent_share = gptq_error_shares(weight, independent.T @ independent / len(independent))["4bit-g64"]
    assert 0 < correlated_share < 0.5 * independent_share <= 1


def test_each_width_has_its_own_share():
    """A weight whose values lie on a 4-bit grid per 32 columns (as a model rebuilt from a Q4_1 GGUF's do): GPTQ's
    fitted grid finds them again at 4-bit g32, not at g64 nor at 3 bits; a width no row fits has no share."""
    weight, hessian = correlated(columns=192)
    rng = np.random.default_rng(2)
    steps = np.exp(rng.normal(size=(len(weight), 6, 1))) * 0.01
    lows = rng.normal(size=(len(weight), 6, 1)) * 0.05
    on_grid = (lows + steps * rng.integers(0, 16, size=(len(weight), 6, 32))).reshape(len(weight), 192)
    shares = gptq_error_shares(on_grid.astype(np.float32), hessian, widths=[(4, 32), (4, 64), (3, 32), (4, 128)])
    assert set(shares) == {"4bit-g32", "4bit-g64", "3bit-g32"}
    assert shares["4bit-g32"] < 0.25 * min(shares["4bit-g64"], shares["3bit-g32"])  # 0.027 against 0.19, 0.28


def test_the_widths_rounded_together_are_each_as_rounded_alone():
    weight, hessian = correlated(rows=40)
    shares = gptq_error_shares(weight, hessian, widths=[(4, 64), (3, 32)])
    for bits, group in ((4, 64), (3, 32)):
        alone = gptq_error_shares(weight, hessian, widths=[(bits, group)])
        assert alone[f"{bits}bit-g{group}"] == pytest.approx(shares[f"{bits}bit-g{group}"], rel=1e-6)
        assert gptq_quantize(weight, hessian, bits, group)["weight"].shape == (40, 256 * bits // 32)


def test_the_shares_scale_the_affine_options_only_each_by_its_own():
    costs = TensorCosts("m", 4096, (Option("mxfp4", 100, 0.4), Option("4bit-g64", 120, 0.2),
                                    Option("8bit-g32", 300, 0.01)))
    scaled = with_gptq_errors(costs, {"4bit-g64": 0.25, "8bit-g32": 0.5})
    assert [o.error for o in scaled.options] == [0.4, 0.05, 0.005]
    assert [(o.kind, o.nbytes) for o in scaled.options] == [(o.kind, o.nbytes) for o in costs.options]
    # a tied embedding a quarter of whose weight is its lookup: GPTQ lowers only the other three quarters
    tied = with_gptq_errors(costs, {"4bit-g64": 0.25, "8bit-g32": 0.5}, looked_up=0.25)
    assert [o.error for o in tied.options] == pytest.approx([0.4, 0.2 * (0.25 + 0.75 * 0.25), 0.01 * 0.625])


def weight_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.mark.slow
def test_bits_planned_and_rounded_by_gptq_beat_4_bit_rounding_at_fewer_bits(family_model, tmp_path):
    from conftest import reference_logits_for
    from test_mlx import held_out_windows
    from test_mlx_bits import mean_kld

    qwen3 = family_model("qwen3")
    windows = held_out_windows(qwen3)
    reference = (windows, reference_logits_for(qwen3, windows))
    fixed = build_mlx(qwen3, tmp_path / "fixed", bits=4, group_size=64, method="gptq")
    planned = build_mlx(qwen3, tmp_path / "planned", bits="auto", plan={"bits_per_weight": 4.4}, method="gptq")
    assert weight_bytes(planned.path) <= weight_bytes(fixed.path)
    assert mean_kld(planned.path, reference) < 0.5 * mean_kld(fixed.path, reference)  # 0.00014 against 0.00119


def test_a_tied_embeddings_looked_up_share_is_measured_on_the_model_or_else_the_roles():
    from siliconvert.calibration import Calibration
    from siliconvert.convert.mlx import _looked_up_share
    from siliconvert.gains import EMBEDDING, HEAD
    from siliconvert.quantize.sensitivity import role_gain

    measured = Calibration("text", gains={EMBEDDING: 0.002, HEAD: 0.006})
    assert _looked_up_share(measured) == pytest.approx(0.25)
    fitted = role_gain("token_embd") / role_gain("token_embd", tied_head=True)
    assert 0 < fitted < 1
    assert _looked_up_share(Calibration("text")) == pytest.approx(fitted)


def outlier_weight(rows: int = 64, columns: int = 256, seed: int = 3) -> np.ndarray:
    """Heavy-tailed rows (Student's t, 3 degrees of freedom), as trained weights are: min-max rounding spends its
    grid on each group's few large values."""
    return np.random.default_rng(seed).standard_t(3, size=(rows, columns)).astype(np.float32)


def group_errors(weight: np.ndarray, arrays: dict, importance: np.ndarray, bits: int, group: int) -> np.ndarray:
    import mlx.core as mx

    rounded = np.asarray(mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], group, bits)
                         .astype(mx.float32))
    return (((rounded - weight) ** 2) * importance).reshape(len(weight), -1, group).sum(-1)


@pytest.mark.parametrize(("bits", "group"), [(4, 64), (3, 32), (2, 128)])
def test_clip_search_never_rounds_a_group_worse_and_clips_where_it_pays(bits, group):
    """`method: clip`: each group keeps the clipped range with the least error weighted by its columns' importance,
    and the whole range is one of those tried, so no group rounds worse than mx.quantize's; on heavy tails the sum
    falls below it. The arrays are mx.quantize's shapes and types."""
    import mlx.core as mx

    from siliconvert.quantize.mlx import QuantPolicy, clip_quantize, quantize

    weight = outlier_weight()
    importance = np.exp(np.random.default_rng(4).normal(size=weight.shape[1])).astype(np.float32)
    policy = QuantPolicy(bits, group)
    plain = quantize(mx.array(weight), policy)
    clipped = clip_quantize(mx.array(weight), policy, importance)
    assert {k: (v.shape, v.dtype) for k, v in clipped.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}
    plain_errors = group_errors(weight, plain, importance, bits, group)
    clipped_errors = group_errors(weight, clipped, importance, bits, group)
    assert np.all(clipped_errors <= plain_errors * (1 + 1e-5))
    assert clipped_errors.sum() < 0.95 * plain_errors.sum()  # 0.91, 0.86, 0.76


def test_clip_search_weighs_each_column_by_its_importance():
    """Where one column's inputs dominate, the search keeps that column's rounding the finer: the weighted error
    is lower, and that column's own error lower, than with every column weighed alike."""
    import mlx.core as mx

    from siliconvert.quantize.mlx import QuantPolicy, clip_quantize

    weight = outlier_weight()
    importance = np.ones(weight.shape[1], dtype=np.float32)
    importance[::64] = 1000.0  # the first column of every group
    policy = QuantPolicy(4, 64)
    weighed = group_errors(weight, clip_quantize(mx.array(weight), policy, importance), importance, 4, 64).sum()
    alike = group_errors(weight, clip_quantize(mx.array(weight), policy, None), importance, 4, 64).sum()
    assert weighed < 0.9 * alike


def test_a_clip_plans_costs_are_the_clipped_roundings_own():
    """With `method: clip` a plan's affine options are costed on clip_quantize's rounding (error and shrink share its
    own, each no more than mx.quantize's); the float modes keep mx.quantize's."""
    from siliconvert.quantize.mlx import clip_rounding
    from siliconvert.quantize.sensitivity import mlx_costs

    weight = outlier_weight(columns=192)
    importance = np.exp(np.random.default_rng(5).normal(size=192)).astype(np.float32)
    plain = {o.kind: o for o in mlx_costs("a", weight, importance, 2).options}
    rounding = clip_rounding(importance)
    clipped = {o.kind: o for o in mlx_costs("a", weight, importance, 2, affine_rounding=rounding).options}
    assert plain.keys() == clipped.keys() and "4bit-g128" not in plain  # 192 columns: no group of 128
    for kind, option in clipped.items():
        assert option.nbytes == plain[kind].nbytes
        if kind.startswith(("mx", "nv")):
            assert option.error == plain[kind].error
        else:
            assert option.error <= plain[kind].error * (1 + 1e-5), kind
    assert clipped["3bit-g64"].error < 0.95 * plain["3bit-g64"].error


def test_a_clipped_folder_opens_in_mlx_lm_and_rounds_every_layer_no_worse(demo_model, tmp_path):
    """`method: clip` end to end on the demo: its own folder name, mlx_lm.load opens it, and each quantized layer's
    error weighted by the calibration inputs is at most 4-bit rounding's."""
    import mlx.core as mx
    from mlx_lm import load

    from siliconvert.calibration import BUILTIN, Calibrations
    from siliconvert.checkpoint import Checkpoint

    plain = build_mlx(demo_model, tmp_path / "rtn", bits=4, group_size=64)
    clipped = build_mlx(demo_model, tmp_path / "clip", bits=4, group_size=64, method="clip")
    assert clipped.path.name.endswith("-mlx-4bit-g64-clip")
    load(str(clipped.path))
    checkpoint = Checkpoint.open(demo_model)
    importance = Calibrations.outside_a_run(checkpoint).importance(BUILTIN)
    sources = {name: array for name, array in ((i.name, a) for i, a in checkpoint.tensors()) if name in importance}
    plain_arrays, clipped_arrays = mx.load(str(plain.path / "model.safetensors")), mx.load(
        str(clipped.path / "model.safetensors"))
    compared = 0
    for name, source in sources.items():
        if f"{name[:-len('.weight')]}.scales" not in plain_arrays:
            continue
        module = name[:-len(".weight")]
        errors = [group_errors(source.astype(np.float32), {k: arrays[f"{module}.{k}"] for k in
                                                           ("weight", "scales", "biases")},
                               importance[name], 4, 64).sum() for arrays in (plain_arrays, clipped_arrays)]
        assert errors[1] <= errors[0] * (1 + 1e-4), name
        compared += 1
    assert compared >= 7 * Checkpoint.open(demo_model).spec.num_layers
