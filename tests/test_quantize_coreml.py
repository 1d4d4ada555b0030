"""Core ML weight compression on its own (quantize/coreml.py): the palettes' names, our k-means (a table of the
right size, weighted by the columns' importance), every palette round-tripped through coremltools' own
functions with its error falling as bits rise, the importance-weighted tables and scales beating plain ones,
coremltools' passes making the ops the packages hold, and W8A8's activation scales and quantize / dequantize pair."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from siliconvert.quantize.coreml import (
    PALETTE_BITS,
    PALETTIZED_OP,
    PRECISIONS,
    QUANTIZED_OP,
    Palette,
    PalettizedWeight,
    activation_scale,
    blob_bytes,
    compress,
    decompress,
    gptq_error_share,
    gptq_rounded,
    kmeans_lut,
    palette_of,
    quantize_weights,
    quantized_input,
    stored_bytes,
    weight_config,
)


def weighted_error(weight: np.ndarray, approx: np.ndarray, importance: np.ndarray) -> float:
    """The layer output's relative error for inputs of mean x² `importance` per column."""
    weight, approx = weight.astype(np.float64), approx.astype(np.float64)
    return float(((weight - approx) ** 2 @ importance).sum() / (weight**2 @ importance).sum())


def outlier_weight(rows: int = 64, columns: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A weight whose few important input columns hold small values (as where a model learnt to scale down
    the weights of its large activations), and their importance: where plain k-means spends its entries on the
    bulk of the values and rounds the columns that matter most coarsely."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((rows, columns))
    importance = np.ones(columns)
    hot = rng.choice(columns, 8, replace=False)
    weight[:, hot] *= 0.05
    importance[hot] = 400.0
    return weight.astype(np.float16), importance


def test_palette_names():
    assert palette_of("pal4") == Palette(4)
    assert palette_of("pal3-lut8") == Palette(3, int8_lut=True)
    assert palette_of("pal6-g32") == Palette(6, group=32)
    assert palette_of("int4") is None and palette_of("int4-b64") is None
    with pytest.raises(ValueError, match="not 5"):
        palette_of("pal5")


def test_the_recipe_takes_every_fixed_precision():
    from typing import get_args

    from siliconvert.recipe import CoreMLPrecision, CoreMLTarget

    assert set(get_args(CoreMLPrecision)) == {"fp16", "auto", *PRECISIONS}
    assert CoreMLTarget(format="coreml", precision=["pal4", "pal3-lut8"]).precisions == ["fp16", "pal4", "pal3-lut8"]


def test_kmeans_lut_gives_a_sorted_fp16_table_and_nearest_indices():
    values = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float16)
    lut, indices = kmeans_lut(values, 3, None)
    assert lut.dtype == np.float16 and lut.shape == (8,) and np.all(np.diff(lut.astype(np.float32)) >= 0)
    assert indices.dtype == np.uint8 and indices.shape == (values.size,)
    distance = np.abs(values.reshape(-1, 1).astype(np.float32) - lut.astype(np.float32))
    np.testing.assert_array_equal(distance[np.arange(values.size), indices], distance.min(axis=1))
    few = np.array([[0.5, -1.0], [0.5, 2.0]], np.float16)  # no more distinct values than entries: exact
    lut, indices = kmeans_lut(few, 2, None)
    np.testing.assert_array_equal(lut[indices].reshape(few.shape), few)


def test_distinct_fp16_values_come_sorted_with_their_indices():
    from siliconvert.quantize.coreml import _distinct_fp16

    values = np.concatenate([np.random.default_rng(2).standard_normal(500), [0.0, 1e-7, -1e-7, 65504, -65504]])
    values = values.astype(np.float16)
    distinct, where = _distinct_fp16(values)
    expected = np.unique(values.astype(np.float64))
    np.testing.assert_array_equal(distinct, expected)
    np.testing.assert_array_equal(distinct[where], values.astype(np.float64))


def test_each_palette_round_trips_and_its_error_falls_with_bits():
    weight, importance = outlier_weight()
    errors, sizes = [], []
    for bits in PALETTE_BITS:
        made = compress(weight, f"pal{bits}", importance)
        assert isinstance(made, PalettizedWeight) and made.lut.shape == (64 // 16, 1, 1 << bits, 1)
        assert decompress(made).shape == weight.shape and decompress(made).dtype == np.float16
        errors.append(weighted_error(weight, decompress(made), importance))
        sizes.append(stored_bytes(made, f"pal{bits}"))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3, errors
    assert sizes == sorted(sizes)
    # pal4 indices take half a byte per weight, plus its tables and the blobs' records
    assert weight.size // 2 < sizes[PALETTE_BITS.index(4)] < weight.size // 2 + 4 * 64 + 4 * 16 * 2 + 64
    # an int8 table (one scale for the weight) costs a little accuracy and half the table's bytes
    lut8 = compress(weight, "pal4-lut8", importance)
    assert lut8.lut.dtype == np.int8 and lut8.lut_scale.size == 1
    assert errors[2] < weighted_error(weight, decompress(lut8), importance) < 1.5 * errors[2]
    assert compress(weight[:40], "pal4") is None  # 40 rows are no whole number of groups of 16: left fp16


@pytest.mark.parametrize(("precision", "at_most"), [("pal2", 0.8), ("pal3", 0.8), ("pal4", 0.8), ("int4", 0.95),
                                                    ("int4-zp", 0.95), ("int8", 0.95)])
def test_importance_weighted_compression_beats_plain_on_the_layer_output(precision, at_most):
    """Palettes: k-means weighted by the columns' importance (the tables move to where the important columns'
    values lie); int4 / int8: each block's scale fitted to it (a block's scale is still set by its largest values,
    so the gain is smaller)."""
    weight, importance = outlier_weight()
    plain = weighted_error(weight, decompress(compress(weight, precision)), importance)
    weighted = weighted_error(weight, decompress(compress(weight, precision, importance)), importance)
    assert weighted < at_most * plain, (weighted, plain)


def test_zero_points_take_the_whole_int4_range_and_fit_better_than_the_pass():
    """int4-zp: coremltools' asymmetric layout (values s·(q − z), q and z int4, −8…7), each block's scale and zero
    point fitted to the importance: never worse by that error than the pass's own min/max fit (a candidate of the
    fit), better than symmetric int4 in the same blocks on a shifted weight, and its zero points stored at 4 bits."""
    weight, importance = outlier_weight()
    shifted = (weight.astype(np.float32) + 1.5 * weight.astype(np.float32).std()).astype(np.float16)
    for source in (weight, shifted):
        pass_own = compress(source, "int4-zp")
        fitted = compress(source, "int4-zp", importance)
        assert fitted.offset is not None and fitted.offset.shape == fitted.scale.shape
        assert -8 <= fitted.data.min() <= fitted.data.max() <= 7
        assert -8 <= fitted.offset.min() <= fitted.offset.max() <= 7
        assert weighted_error(source, decompress(fitted), importance) <= weighted_error(source, decompress(pass_own),
                                                                                       importance)
    symmetric = weighted_error(shifted, decompress(compress(shifted, "int4", importance)), importance)
    assert weighted_error(shifted, decompress(compress(shifted, "int4-zp", importance)), importance) < 0.5 * symmetric
    made = compress(weight, "int4-zp-b64", importance)
    assert made.scale.shape[1] == weight.shape[1] // 64
    assert stored_bytes(made, "int4-zp-b64") == stored_bytes(compress(weight, "int4-b64"), "int4-b64") + \
        blob_bytes(-(-made.offset.size // 2))


def test_the_passes_make_the_ops_the_packages_hold():
    """quantize_weights over a one-function program: each const at its own precision, the int8 tables through the
    linear pass's joint compression, and what they made equal to `compress` of the same weight."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    weights = {name: outlier_weight(64, 128)[0] * scale for name, scale in (("a", 1), ("b", 2), ("c", 3))}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 128, 1, 1), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x):
        outputs = []
        for name, value in weights.items():
            const = mb.const(val=value.reshape(64, 128, 1, 1), name=name)
            const.op.weight_id = name
            outputs.append(mb.conv(x=x, weight=const, name=f"conv_{name}"))
        return mb.concat(values=outputs, axis=1)

    precisions = {"a": "int4", "b": "pal4", "c": "pal3-lut8"}
    importance = outlier_weight(64, 128)[1]
    function = program.functions["main"]
    made = quantize_weights(function, precisions.get, {"a": importance, "b": importance}.get)
    assert made["a"].data.dtype == compress(weights["a"], "int4").data.dtype and made["a"].data.max() <= 7
    assert isinstance(made["b"], PalettizedWeight) and made["b"].lut_scale is None
    assert isinstance(made["c"], PalettizedWeight) and made["c"].lut.dtype == np.int8
    for name in ("a", "b", "c"):
        expected = compress(weights[name], precisions[name], importance if name != "c" else None)
        np.testing.assert_array_equal(decompress(made[name]).reshape(64, 128), decompress(expected))
    ops = {op.op_type for op in function.operations}
    assert {PALETTIZED_OP, QUANTIZED_OP} <= ops


def test_w8a8_weights_are_int8_per_channel_and_its_activations_per_tensor_symmetric():
    """w8a8's weights take int8's config (per output channel, symmetric); an activation's scale is its peak / 127
    in fp16 (coremltools' linear_symmetric from an (−peak, peak) range), 1 for a peak of 0 (as that pass makes a
    zero scale); the pair the graph puts before a linear layer is an iOS 17 quantize to int8 and its dequantize,
    with one scalar scale and no zero point, the ops linear_quantize_activations inserts."""


def correlated_inputs(rows: int = 64, columns: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A weight (fp16) and the second moments of inputs whose columns are correlated and of unequal scales, as a
    layer's are: what GPTQ's carried errors cancel on."""
    rng = np.random.default_rng(1)
    mixing = np.eye(columns) + 0.1 * rng.normal(size=(columns, columns))
    x = rng.normal(size=(2048, columns)) @ mixing * np.exp(rng.normal(size=columns))
    return (0.05 * rng.normal(size=(rows, columns))).astype(np.float16), x.T @ x / len(x)


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """The layer output's mean squared error over the inputs, tr(ΔW H ΔWᵀ)."""
    delta = weight.astype(np.float64) - approx.reshape(weight.shape).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", delta, hessian, delta))


@pytest.mark.parametrize(("precision", "at_most"), [("int4", 0.5), ("int4-zp", 0.5), ("int8", 0.5), ("pal4", 0.5),
                                                    ("pal3-lut8", 0.5), ("pal2", 0.6)])
def test_gptq_beats_rounding_on_the_layer_output(precision, at_most):
    """GPTQ against the inputs' second moments beats the importance-fitted rounding of the same layout (the same
    blocks for int4 / int8, the same tables for a palette), which weighs the same inputs' diagonal only."""
    weight, hessian = correlated_inputs()
    rounded = compress(weight, precision, np.diag(hessian))
    compensated = gptq_rounded(weight, rounded, hessian, precision)
    assert type(compensated) is type(rounded)
    for part in ("data", "scale", "indices", "lut", "lut_scale"):  # the same layout: the bytes the package holds
        mine, theirs = getattr(compensated, part, None), getattr(rounded, part, None)
        assert (mine is None) == (theirs is None) and (mine is None or (mine.shape, mine.dtype) == (theirs.shape,
                                                                                                    theirs.dtype))
    if isinstance(rounded, PalettizedWeight):
        assert np.array_equal(compensated.lut, rounded.lut)  # the tables are kept; only the indices move
    assert stored_bytes(compensated, precision) == stored_bytes(rounded, precision)
    ours, nearest = (output_error(weight, decompress(w), hessian) for w in (compensated, rounded))
    assert ours < at_most * nearest, (ours, nearest)


def test_quantize_weights_rounds_by_gptq_where_a_hessian_is_given():
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    assert weight_config("w8a8") == weight_config("int8")
    assert activation_scale(63.5) == np.float16(0.5) and activation_scale(0.0) == np.float16(1)
    assert activation_scale(1000.0) == np.float16(1000.0 / 127)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8, 1, 4), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x):
        return quantized_input(x, activation_scale(12.7), "l0_q")

    ops = program.functions["main"].operations
    quantize, dequantize = (op for op in ops if op.op_type in ("quantize", "dequantize"))
    assert (quantize.op_type, dequantize.op_type) == ("quantize", "dequantize")
    assert quantize.output_dtype.val == "int8" and quantize.zero_point is None and quantize.axis is None
    assert quantize.scale.val == dequantize.scale.val == np.float16(0.1) and quantize.scale.val.shape == ()
    assert dequantize.input is quantize.outputs[0] and dequantize.outputs[0].dtype == types.fp16


    weight, hessian = correlated_inputs(64, 128)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 128, 1, 1), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x):
        outputs = []
        for name in ("a", "b", "c"):
            const = mb.const(val=weight.reshape(64, 128, 1, 1), name=name)
            const.op.weight_id = name
            outputs.append(mb.conv(x=x, weight=const, name=f"conv_{name}"))
        return mb.concat(values=outputs, axis=1)

    precisions = {"a": "int4", "b": "pal4", "c": "int4"}
    made = quantize_weights(program.functions["main"], precisions.get, lambda name: np.diag(hessian),
                            {"a": hessian, "b": hessian}.get)
    for name in ("a", "b"):
        expected = gptq_rounded(weight, compress(weight, precisions[name], np.diag(hessian)), hessian,
                                precisions[name])
        np.testing.assert_array_equal(decompress(made[name]).reshape(64, 128), decompress(expected))
    # c has no hessian: the importance-fitted rounding, as before
    np.testing.assert_array_equal(decompress(made["c"]).reshape(64, 128),
                                  decompress(compress(weight, "int4", np.diag(hessian))))


def test_gptq_error_share_is_measured_per_precision_and_falls_with_correlated_inputs():
    """GPTQ's share of rounding's output error, on a sample of whole groups of rows: below 1 where the inputs
    correlate (its carried errors cancel), lower there than for independent inputs of the same scales, and the
    sample's share near the whole weight's."""
    weight, hessian = correlated_inputs(128, 256)
    independent = np.diag(np.diag(hessian))
    for precision in ("int4", "int4-b64", "int4-zp-b64", "pal4", "pal3"):
        correlated = gptq_error_share(weight, hessian, precision, np.diag(hessian))
        alone = gptq_error_share(weight, independent, precision, np.diag(hessian))
        assert 0 < correlated < alone <= 1, (precision, correlated, alone)
        rounded = compress(weight, precision, np.diag(hessian))
        whole = (output_error(weight, decompress(gptq_rounded(weight, rounded, hessian, precision)), hessian)
                 / output_error(weight, decompress(rounded), hessian))
        sampled = gptq_error_share(weight, hessian, precision, np.diag(hessian), sampled_rows=32)
        assert sampled == pytest.approx(whole, rel=0.25), (precision, sampled, whole)
    # rows that make no whole palette group: nothing to compress, so no share below rounding's
    assert gptq_error_share(weight[:8], hessian, "pal4") == 1.0


def test_gptq_error_share_measured_on_text_it_was_not_fitted_to_is_larger():
    """GPTQ fitted to the second moments of a few inputs keeps less of its gain on other inputs of the same kind:
    the share a plan measures on held-out moments (`measured_on`) is above the share on the fitted ones, and
    measuring on the fitted ones is the default."""
    rng = np.random.default_rng(2)
    columns = 256
    mixing = (np.eye(columns) + 0.1 * rng.normal(size=(columns, columns))) * np.exp(rng.normal(size=columns))
    first, second = (rng.normal(size=(384, columns)) @ mixing for _ in range(2))
    fitted, held_out = (x.T @ x / len(x) for x in (first, second))
    weight = (0.05 * rng.normal(size=(64, columns))).astype(np.float16)
    for precision in ("int4", "int4-zp", "pal4"):
        on_fitted = gptq_error_share(weight, fitted, precision, np.diag(fitted))
        assert gptq_error_share(weight, fitted, precision, np.diag(fitted), measured_on=fitted) == on_fitted
        assert on_fitted < 0.9 * gptq_error_share(weight, fitted, precision, np.diag(fitted), measured_on=held_out)


def test_coremltools_warnings_sent_to_the_root_logger_do_not_reach_the_users_output():
    """coremltools' optimize logs "Invalid block_sizes" on the root logger for each int4 block a plan tries that the
    row does not divide; a siliconvert process prints none of it, and still prints others' warnings."""
    script = ("import logging, numpy as np, siliconvert\n"
              "from coremltools.optimize._utils import compute_qparams\n"
              "assert compute_qparams(np.ones((30, 30), np.float32), 4, True, 'LINEAR_SYMMETRIC', np.int8, [1, 13])"
              " is None\n"
              "logging.warning('a warning of our own')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Invalid block_sizes" not in run.stderr and "a warning of our own" in run.stderr
