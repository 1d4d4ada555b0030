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



def test_a_tied_table_is_rounded_by_gptq_against_both_its_uses(family_model, tmp_path):
    """The MLX writer's H for a tied embedding (and the Core ML writer's, for the blob that embeds and is the head):
    the head's inputs' plus λ on the diagonal for its rows looked up, by the lookup's share of the gain measured on
    the model (`for_both_uses`); an untied weight's H is its own inputs'."""
    from siliconvert.calibration import BUILTIN, SENSITIVITY, Calibrations
    from siliconvert.checkpoint import Checkpoint, read_model_tensor
    from siliconvert.convert.coreml.chunks import plan_chunks
    from siliconvert.convert.coreml.plan import ColumnImportance, tied_table
    from siliconvert.convert.mlx import MLXWriter
    from siliconvert.gains import HEAD
    from siliconvert.quantize.sensitivity import column_squares, for_both_uses, looked_up_share
    from siliconvert.recipe import MLXTarget

    checkpoint = Checkpoint.open(family_model("gemma2"))  # ties its head, as Gemma 2 ships
    assert checkpoint.spec.tie_word_embeddings
    calibration = Calibrations.outside_a_run(checkpoint)
    target = MLXTarget(format="mlx", bits=4, group_size=32, method="gptq", model_file="faithful")
    writer = MLXWriter(checkpoint, target, tmp_path, checkpoint.name, calibration=calibration)
    table_name = "model.embed_tokens.weight"
    table = read_model_tensor(checkpoint.tensor_infos[table_name])
    head = calibration.hessians(BUILTIN)[HEAD]
    share = looked_up_share(calibration.get(BUILTIN, {SENSITIVITY}))
    assert 0 < share < 1
    expected = for_both_uses(head, column_squares(table), share)
    assert np.array_equal(writer._hessian_of(table_name, table), expected)
    assert not np.allclose(np.diag(expected), np.diag(head))
    down = "model.layers.0.mlp.down_proj.weight"
    assert writer._hessian_of(down, read_model_tensor(checkpoint.tensor_infos[down])) is calibration.hessians(
        BUILTIN)[down]

    tied = tied_table(checkpoint, calibration)
    hessians = ColumnImportance(checkpoint, calibration.hessians(BUILTIN), tied)
    (chunk,) = plan_chunks(checkpoint.spec, 1)
    whole = slice(None)
    assert np.allclose(hessians.of(chunk, ("token_embd", None, "weight"), whole), expected, rtol=1e-5)
    assert np.array_equal(ColumnImportance(checkpoint, calibration.hessians(BUILTIN)).of(
        chunk, ("token_embd", None, "weight"), whole), head)
