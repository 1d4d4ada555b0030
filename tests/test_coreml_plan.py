"""Core ML packages planned per weight (precision: auto): the recipe forms; on the demo model, a size goal kept, a
quality goal met by the package as the MIL interpreter runs it, the estimate held to the measured KLD of the fixed
int8 and int4 packages, and the same plan giving the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from siliconvert.calibration import Calibration
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter
from siliconvert.convert.coreml.plan import ZERO_POINT_SPEC_BYTES, WeightPlanner, with_gptq_errors
from siliconvert.errors import RecipeError
from siliconvert.quantize.coreml import ZERO_POINTS
from siliconvert.quantize.sensitivity import KLD_PER_ERROR, coreml_costs, error_of, role_gain
from siliconvert.recipe import CoreMLTarget, parse_recipe
from siliconvert.textdata import heldout_text
from siliconvert.validate.metrics import compare
from siliconvert.validate.runners.coreml import CoreMLRunner

CONTEXT = 128
KLD_GOAL = 0.001  # between the demo model's int8 (~0.00002) and int4 (~0.003) packages


class _Measured:
    """A run's calibrations that measured gains for the first layer's down projection, the embedding and the head."""

    def get(self, source, parts):
        gains = {"model.layers.0.mlp.down_proj.weight": 0.004, "model.embed_tokens.weight": 0.2,
                 "lm_head.weight": 0.1}
        return Calibration(source, importance={}, expert_tokens={}, gains=gains,
                           shrink_gains={name: 50 * gain for name, gain in gains.items()}, sensitivity_tokens=256)


def test_weights_take_the_gains_measured_on_the_model(random_llama: Path):
    planner = WeightPlanner(Checkpoint.open(random_llama), None, calibration=_Measured())
    every_row = slice(None)
    assert planner._gains(("ffn_down", 0, "weight"), False, False, every_row) == (0.004, 50 * 0.004, 0.0)
    assert planner._gains(("ffn_down", 1, "weight"), False, False, every_row) == (role_gain("ffn_down"), None, 0.0)
    table = ("token_embd", None, "weight")
    # a tied table that embeds and is the head: both paths' gains, two thirds of them as the embedding looked up
    assert planner._gains(table, True, True, every_row) == (pytest.approx(0.3), pytest.approx(50 * 0.3),
                                                            pytest.approx(2 / 3))
    # a piece of it that a split head projects through and the embedding gathers from: its rows' share of both
    vocab = planner.spec.vocab_size
    piece = slice(0, vocab // 4)
    share = len(range(vocab)[piece]) / vocab
    assert planner._gains(table, True, True, piece) == (pytest.approx(0.3 * share), pytest.approx(50 * 0.3 * share),
                                                        pytest.approx(2 / 3))
    assert planner._gains(table, False, True, piece) == (pytest.approx(0.1 * share), pytest.approx(50 * 0.1 * share),
                                                         0.0)


def test_gptq_candidates_take_their_measured_share_of_rounding_error():
    """A plan of GPTQ-rounded weights: fp16 stays exact, every compressed candidate's error is GPTQ's (below
    rounding's where the inputs correlate), its bytes unchanged."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2048, 256)) @ (np.eye(256) + 0.1 * rng.normal(size=(256, 256)))
    hessian = x.T @ x / len(x)
    weight = (0.05 * rng.normal(size=(64, 256))).astype(np.float16)
    costs = coreml_costs("w", weight, np.diag(hessian), candidates=("fp16", "int4", "pal4", "pal3"))
    rounded = with_gptq_errors(costs, weight, hessian, np.diag(hessian))
    for before, after in zip(costs.options, rounded.options, strict=True):
        assert (after.kind, after.nbytes) == (before.kind, before.nbytes)
        assert after.error == 0 if after.kind == "fp16" else 0 < after.error < 0.8 * before.error, after
    # a tied table's part as the embedding looked up keeps rounding's error: GPTQ lowers only the head's part
    tied = with_gptq_errors(costs, weight, hessian, np.diag(hessian), looked_up=0.25)
    for before, after, table in zip(costs.options, rounded.options, tied.options, strict=True):
        assert table.error == pytest.approx(0.25 * before.error + 0.75 * after.error), table


def test_recipe_forms():
    target = CoreMLTarget(format="coreml", precision="auto", plan={"max_mean_kld": 0.01})
    assert target.precisions == ["fp16", "auto-kld0.01"]
    target = CoreMLTarget(format="coreml", precision=["int4", "auto"], plan={"size_mb": 3.5})
    assert target.precisions == ["fp16", "int4", "auto-3.5MB"]
    recipe = {"source": "x", "targets": [{"format": "coreml", "precision": ["auto"]}]}
    with pytest.raises(RecipeError, match="precision: auto needs a plan"):
        parse_recipe(recipe)
    recipe["targets"][0] = {"format": "coreml", "precision": "int4", "plan": {"bits_per_weight": 5}}
    with pytest.raises(RecipeError, match="plan is only read with precision: auto"):
        parse_recipe(recipe)


def build(out_dir: Path, **target) -> tuple[dict[str, Path], CoreMLWriter]:
    """The Core ML writer over the demo model's stream; its packages by precision, and the writer."""
    from siliconvert.demo import demo_checkpoint

    checkpoint = Checkpoint.open(demo_checkpoint())
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT, **target), out_dir, "demo")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    return {a.quant: a for a in writer.finish()}, writer


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def weight_bin(folder: Path) -> int:
    return folder_bytes(folder / "chunk_01.mlpackage" / "Data" / "com.apple.CoreML" / "weights")


@pytest.fixture(scope="module")
def scored(demo_model):
    """mean_kld(folder): the package's mean KLD to transformers over two held-out windows, run by the MIL
    interpreter as the project's validation runs Core ML on Linux."""
    from conftest import reference_logits_for
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(demo_model).encode(heldout_text()[:40000], add_special_tokens=False)
    windows = np.array([ids[i * CONTEXT:(i + 1) * CONTEXT] for i in range(2)])
    reference = reference_logits_for(demo_model, windows)
    vocab = reference.shape[-1]

    def mean_kld(folder: Path) -> float:
        runner = CoreMLRunner(folder, {"compute_units": "all"})
        logits = np.stack([runner.logits(window) for window in windows])
        return compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                       windows[:, 1:].reshape(-1))[0].mean_kld
    return mean_kld


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """fp16, int8, int4, int4-zp and a package planned for KLD_GOAL, from one pass; the plan's measured costs."""
    artifacts, writer = build(tmp_path_factory.mktemp("coreml-plan"), precision=["int8", "int4", "int4-zp", "auto"],
                              plan={"max_mean_kld": KLD_GOAL})
    return artifacts, writer.planner.costs


@pytest.mark.slow
def test_a_quality_goal_is_met_and_smaller_than_fp16(planned, scored):
    artifacts, _ = planned
    ours = artifacts[f"auto-kld{KLD_GOAL:g}"]
    assert ours.plan["predicted_mean_kld"] <= KLD_GOAL
    assert len(ours.plan["types"]) > 1  # a mix, not one precision
    # the writer alone, without the pipeline's re-plan: within the estimate's spread on this model's fixed packages
    # (measured over predicted, 2 windows: int8 0.96, int4 1.03, pal6 0.92–0.94, pal4 1.03–1.12)
    assert scored(ours.path) <= 1.2 * KLD_GOAL
    assert folder_bytes(ours.path) < 0.6 * folder_bytes(artifacts["fp16"].path)
    # the plan's bytes are the package's: the weight.bin of int4 and of the plan differ by their planned weights'
    # (a zero-point weight's planned bytes count its spec's const too)
    spec = ZERO_POINT_SPEC_BYTES * sum(count for precision, count in ours.plan["types"].items()
                                       if ZERO_POINTS in precision)
    assert weight_bin(ours.path) - (ours.plan["planned_bytes"] - spec) == \
        weight_bin(artifacts["int4"].path) - bytes_at(planned[1], "int4")


@pytest.mark.slow
def test_zero_points_cost_their_stored_bytes_and_beat_symmetric_int4(planned, scored):
    """int4-zp stores int4's blocks and an int4 zero point each (packed two to a byte, as the plan counts them), and
    on the demo model its fitted scales and zero points beat symmetric int4's fitted scales."""
    artifacts, costs = planned
    zero_points = [c for c in costs if any(o.kind == "int4-zp" for o in c.options)]
    assert len(zero_points) == len(costs)
    assert weight_bin(artifacts["int4-zp"].path) - weight_bin(artifacts["int4"].path) == \
        bytes_at(costs, "int4-zp") - ZERO_POINT_SPEC_BYTES * len(costs) - bytes_at(costs, "int4")
    assert scored(artifacts["int4-zp"].path) < 0.8 * scored(artifacts["int4"].path)


def bytes_at(costs, precision: str) -> int:
    """The bytes of every planned weight at one precision."""
    return sum(next(o.nbytes for o in c.options if o.kind == precision) for c in costs)


@pytest.mark.slow
def test_the_estimate_follows_measured_kld(planned, scored):
    """The predicted mean KLD of the fixed int8 and int4 packages (every planned weight at one precision) lies
    within a factor of 3 of their measured KLD, and ranks them as measured."""
    artifacts, costs = planned
    predicted = [KLD_PER_ERROR * error_of(costs, {c.name: p for c in costs}) for p in ("int8", "int4")]
    measured = [scored(artifacts[p].path) for p in ("int8", "int4")]
    assert predicted[0] < predicted[1] and measured[0] < measured[1]
    ratios = np.array(measured) / np.array(predicted)
    assert np.all((ratios > 1 / 3) & (ratios < 3)), (predicted, measured)


@pytest.mark.slow
def test_a_size_goal_is_kept_and_beats_int4_there_and_the_same_plan_gives_the_same_bytes(planned, scored, tmp_path):
    """At the fixed int4 package's size, a plan (int4 in other block sizes, int8 where it pays) scores better."""
    artifacts, _ = planned
    size_mb = folder_bytes(artifacts["int4"].path) / 1e6
    label = f"auto-{size_mb:g}MB"
    first, _ = build(tmp_path / "a", precision="auto", plan={"size_mb": size_mb})
    ours = first[label]
    assert ours.plan["bytes"] >= folder_bytes(ours.path)  # the plan counts every byte, or a few more
    assert folder_bytes(ours.path) <= size_mb * 1e6
    assert scored(ours.path) < scored(artifacts["int4"].path)
    second, _ = build(tmp_path / "b", precision="auto", plan={"size_mb": size_mb})
    assert second[label].plan == ours.plan
    for file, again in zip(sorted(ours.path.rglob("*")), sorted(second[label].path.rglob("*")), strict=True):
        assert file.relative_to(ours.path) == again.relative_to(second[label].path)
        assert file.is_dir() or file.read_bytes() == again.read_bytes(), file


@pytest.mark.slow
def test_a_plan_rounded_by_gptq_beats_the_plan_rounded_to_nearest_at_its_size(planned, scored, tmp_path):
    """At the fixed int4 package's size, the plan of GPTQ-rounded weights (each candidate costed at GPTQ's measured
    share of its error, pal3 among them) keeps the size and scores under half the plan rounded to nearest (the
    demo at Q4_K_M's bytes, 512 tokens: 0.00027 against 0.00276)."""
    artifacts, _ = planned
    size_mb = folder_bytes(artifacts["int4"].path) / 1e6
    rounded = build(tmp_path / "rtn", precision="auto", plan={"size_mb": size_mb})[0][f"auto-{size_mb:g}MB"]
    ours = build(tmp_path / "gptq", precision="auto", plan={"size_mb": size_mb}, method="gptq")[0][
        f"auto-{size_mb:g}MB-gptq"]
    assert folder_bytes(ours.path) <= size_mb * 1e6
    assert ours.plan["predicted_mean_kld"] < rounded.plan["predicted_mean_kld"]
    assert scored(ours.path) < 0.5 * scored(rounded.path), ours.plan["types"]
