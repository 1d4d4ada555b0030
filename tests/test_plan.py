"""The planner on small arrays: no checkpoint, fast."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from siliconvert.errors import RecipeError
from siliconvert.quantize.plan import make_plan
from siliconvert.quantize.sensitivity import (
    Option,
    TensorCosts,
)
from siliconvert.recipe import QuantPlan, parse_recipe


def synthetic_costs() -> list[TensorCosts]:
    """Three tensors whose options are convex in (bytes, error), one far more sensitive than the others."""
    def options(scale: float) -> tuple[Option, ...]:
        return tuple(Option(f"b{bits}", 100 * bits, scale * 4.0 ** -bits) for bits in (2, 3, 4, 5, 6, 8))
    return [TensorCosts(name, 800, options(scale)) for name, scale in (("a", 1.0), ("b", 8.0), ("c", 0.2))]


def brute_force(costs: list[TensorCosts], fits) -> tuple[int, float]:
    """(bytes, error) of the best combination by exhaustive search: fewest bytes among those `fits` accepts,
    then least error."""
    best = None
    for combo in itertools.product(*(c.options for c in costs)):
        nbytes, error = sum(o.nbytes for o in combo), sum(o.error for o in combo)
        if fits(nbytes, error) and (best is None or (nbytes, error) < best):
            best = (nbytes, error)
    return best


@pytest.mark.parametrize("max_kld", [1e-4, 3e-4, 1e-3, 5e-3])
def test_a_quality_goal_gets_close_to_the_fewest_bytes_that_meet_it(max_kld):
    costs = synthetic_costs()
    plan = make_plan(costs, QuantPlan(max_mean_kld=max_kld, kld_per_error=0.1))
    assert plan.predicted_kld <= max_kld
    fewest = brute_force(costs, lambda _, error: 0.1 * error <= max_kld)[0]
    assert fewest <= plan.planned_bytes <= fewest + 100  # the front's points are optimal; between them, one step
    # the sensitive tensor gets at least as many bits as any other
    assert plan.choices["b"].nbytes >= max(plan.choices["a"].nbytes, plan.choices["c"].nbytes)


@pytest.mark.parametrize("bits", [3.0, 4.0, 4.5, 6.0])
def test_a_size_goal_stays_within_it_and_spends_it_where_it_helps(bits):
    costs = synthetic_costs()
    plan = make_plan(costs, QuantPlan(bits_per_weight=bits, kld_per_error=0.1))
    assert plan.planned_bytes <= bits * 2400 / 8
    uniform = sum(o.error for c in costs for o in c.options if o.kind == f"b{int(bits)}")
    assert plan.predicted_kld <= 0.1 * uniform  # never worse than the same width everywhere


def test_a_size_goal_counts_the_fixed_bytes():
    plan = make_plan(synthetic_costs(), QuantPlan(size_mb=0.0015), fixed_bytes=300)
    assert plan.nbytes <= 1500 and plan.nbytes == plan.planned_bytes + 300


def test_the_plan_summary_names_every_tensor():
    summary = make_plan(synthetic_costs(), QuantPlan(bits_per_weight=4)).summary()
    assert set(summary["tensors"]) == {"a", "b", "c"}
    assert sum(summary["types"].values()) == 3
    assert summary["bits_per_weight"] <= 4


@pytest.mark.parametrize(("target", "problem"), [
    ({"format": "gguf", "quants": ["auto"]}, "auto needs a plan"),
    ({"format": "gguf", "quants": ["Q4_K_M"], "plan": {"size_mb": 3}}, "plan is only read with quants: auto"),
    ({"format": "mlx", "bits": "auto"}, "auto needs a plan"),
    ({"format": "mlx", "bits": 4, "plan": {"max_mean_kld": 0.01}}, "plan is only read with bits: auto"),
    ({"format": "mlx", "bits": "auto", "plan": {"max_mean_kld": 0.01, "size_mb": 3}}, "exactly one of"),
    ({"format": "gguf", "quants": ["auto"], "plan": {"bits_per_weight": 1}}, "bits_per_weight"),
])
def test_plan_recipe_errors_name_the_key(target, problem):
    with pytest.raises(RecipeError, match=problem):
        parse_recipe({"source": "x", "targets": [target]})


def test_a_plan_names_its_artifact():
    recipe = parse_recipe({"source": "x", "targets": [
        {"format": "gguf", "quants": ["Q4_K_M", "auto"], "plan": {"size_mb": 3.4}},
        {"format": "mlx", "bits": "auto", "plan": {"max_mean_kld": 0.01}}]})
    assert recipe.targets[0].file_quant("auto") == "auto-3.4MB"
    assert recipe.targets[1].quant == "auto-kld0.01"


def test_the_report_and_the_card_say_the_plan_and_each_try():
    from siliconvert.artifacts import Release
    from siliconvert.format import entry as format_entry
    from siliconvert.validate.report import plan_lines

    plan = make_plan(synthetic_costs(), QuantPlan(max_mean_kld=1e-3)).summary() | {
        "float_type": "float16", "float_type_reason": "float16 for the source's bfloat16: the stream peaks at 9.5"}
    plan["tries"] = [{"try": 1, "predicted_mean_kld": 9e-4, "measured_mean_kld": 2e-3, "bits_per_weight": 4.0,
                      "met": False},
                     {"try": 2, "predicted_mean_kld": 9e-4, "measured_mean_kld": 8e-4, "bits_per_weight": 4.6,
                      "met": True}]
    entry = {"format": "mlx", "quant": "auto-kld0.001", "plan": plan, "metrics": {"mean_kld": 8e-4}}
    text = "\n".join(plan_lines([entry, {"format": "gguf", "quant": "Q4_K_M", "plan": None}]))
    assert "**mlx auto-kld0.001**" in text and "Q4_K_M" not in text
    assert "- try 1: predicted 0.00090, measured 0.00200 at 4.00 bits per weight: missed\n" in text
    assert "- try 2: predicted 0.00090, measured 0.00080 at 4.60 bits per weight\n" in text + "\n"
    assert "- float type: float16 for the source's bfloat16: the stream peaks at 9.5\n" in text
    assert all(f"| {name} | {kind} |" in text for name, kind in plan["tensors"].items())
    release = Release("demo-auto-kld0.001", "demo", "mlx", [entry], [], None)
    assert format_entry("mlx").summary(release) == (f"MLX weights quantized per module by plan "
                                                    f"({plan['bits_per_weight']:.2f} bits per weight, float16 "
                                                    "elsewhere)")
    assert plan_lines([]) == []


def _fake_replanner(monkeypatch, measure):
    """A Replanner whose builds are fake: a plan's summed error is what exactly meets its own prediction of
    the goal (as the planner would), and `measure(summed_error)` is the artifact's measured mean KLD."""
    import siliconvert.commands.pipeline as pipeline
    from siliconvert.artifacts import Artifact

    path, builds = Path("demo-auto.gguf"), []

    def artifact(plan: QuantPlan) -> Artifact:
        scale, floor = plan.kld_per_error or 1.0, plan.kld_floor or 0.0
        error = (plan.max_mean_kld - floor) / scale
        return Artifact("gguf", "auto-kld0.01", path, plan={"predicted_mean_kld": plan.max_mean_kld,
                                                             "summed_error": error, "kld_per_error": scale,
                                                             "kld_floor": floor, "bits_per_weight": 4.0})

    def convert(_checkpoint, recipe, _dir, _timings, *, calibration):
        (target,) = recipe.targets
        builds.append(target)
        return [(artifact(target.plan), target)]

    monkeypatch.setattr(pipeline, "convert", convert)
    target = parse_recipe({"source": "x", "targets": [
        {"format": "gguf", "quants": ["auto"], "plan": {"max_mean_kld": 0.01}}]}).targets[0]
    first = artifact(target.plan)
    replan = pipeline.Replanner(None, parse_recipe({"source": "x", "targets": [target.model_dump()]}),
                                [(first, target)], Path("."), None)

    def score(built, measured=None, size=100):
        measured = measure(built.plan["summed_error"]) if measured is None else measured
        entry = {"metrics": {"mean_kld": measured}, "size_bytes": size}
        return replan(built, entry), entry

    return first, score, builds


def test_the_replan_loop_tightens_a_miss_loosens_a_waste_and_keeps_what_met(monkeypatch):
    """A miss is planned again tighter; a try far under its target is planned again looser; when the last
    try misses, the smallest that met is written again."""
    first, score, builds = _fake_replanner(monkeypatch, lambda error: 0.0)
    second, _ = score(first, 0.02, 100)  # missed by 2×: tighter
    assert builds[-1].plan.kld_per_error == pytest.approx(2.0 / 0.9)
    third, _ = score(second, 0.003, 120)  # met far under: looser
    assert builds[-1].plan.kld_per_error < builds[-2].plan.kld_per_error
    restored, _ = score(third, 0.011, 90)  # the last try missed: the one that met (try 2) again
    assert builds[-1] == builds[0] and restored is not None
    done, entry = score(restored, 0.003, 120)
    assert done is None
    assert [t["met"] for t in entry["plan"]["tries"]] == [False, True, False]
    assert entry["plan"]["tries"][-1]["restored"]


def test_the_replan_loop_finds_a_runtime_floor_from_two_tries(monkeypatch):
    """Measured KLD = 0.005 (the runtime's own rounding) + 1 × error: a prediction scaled as a whole misses twice
    near the floor; the line through two tries finds the floor, and the third try meets the target."""
    first, score, builds = _fake_replanner(monkeypatch, lambda error: 0.005 + error)
    second, _ = score(first)  # 0.015: missed
    third, _ = score(second)  # tighter, still missed (the floor taken for error)
    assert builds[-1].plan.kld_floor == pytest.approx(0.005 / 0.9)
    assert builds[-1].plan.kld_per_error == pytest.approx(1 / 0.9)
    done, entry = score(third)
    assert done is None and [t["met"] for t in entry["plan"]["tries"]] == [False, False, True]
    assert entry["metrics"]["mean_kld"] == pytest.approx(0.009)


def test_the_replan_loop_keeps_the_smallest_try_that_met(monkeypatch):
    """The last try met, but an earlier one met with fewer bytes: that one is written again."""
    first, score, builds = _fake_replanner(monkeypatch, lambda error: 0.0)
    second, _ = score(first, 0.002, 100)  # met far under: looser
    third, _ = score(second, 0.02, 80)  # missed: tighter
    restored, _ = score(third, 0.0085, 110)  # met, but with more bytes than try 1
    assert restored is not None and builds[-1].plan.kld_per_error is None  # the recipe's own plan: try 1


def test_the_replan_loop_stops_where_the_plan_cannot_move(monkeypatch):
    """A plan far under its target whose tensors all have their cheapest types is not built again."""
    first, score, builds = _fake_replanner(monkeypatch, lambda error: 0.001)
    first.plan["cheapest"] = True
    done, entry = score(first)
    assert done is None and builds == [] and entry["plan"]["tries"][0]["met"]


def test_fit_prediction_takes_the_floor_from_two_tries_and_the_prior_from_one():
    from siliconvert.commands.pipeline import fit_prediction

    one = [{"summed_error": 0.01, "measured_mean_kld": 0.03}]
    assert fit_prediction(one, 0.0) == pytest.approx((3.0, 0.0))
    assert fit_prediction(one, 0.01) == pytest.approx((2.0, 0.01))
    assert fit_prediction(one, 0.05) == pytest.approx((3.0, 0.0))  # measured under the prior floor: no floor
    two = [{"summed_error": 0.02, "measured_mean_kld": 0.05}, *one]
    assert fit_prediction(two, 0.0) == pytest.approx((2.0, 0.01))
    noisy = [{"summed_error": 0.02, "measured_mean_kld": 0.02}, *one]  # more error, less KLD: no line
    assert fit_prediction(noisy, 0.0) == pytest.approx((3.0, 0.0))
    # two plans measured alike (seen: 0.000375 at error 0.000278, 0.000372 at 0.000191): noise, not a floor of
    # 0.00036 that would send the next plan to its most exact types
    alike = [{"summed_error": 0.000278, "measured_mean_kld": 0.000375},
             {"summed_error": 0.000191, "measured_mean_kld": 0.000372}]
    assert fit_prediction(alike, 0.0) == pytest.approx((0.000372 / 0.000191, 0.0))


@pytest.mark.slow
def test_an_mlx_size_plan_counts_the_modules_mlx_lm_keeps_at_their_own_width(family_model, tmp_path):
    """mlx-lm's Granite keeps o_proj, down_proj and lm_head at 8 bits (its quant_predicate). A plan leaves them so
    and counts their 8-bit bytes: at 4-bit g64's size it fills the bytes left (counted as float16 they once left
    none, and every planned module fell to 2 bits)."""
    import json

    from conftest import build_mlx

    source = family_model("granite")
    four_bit = build_mlx(source, tmp_path / "fixed", bits=4, group_size=64)
    size = sum(f.stat().st_size for f in four_bit.path.iterdir())
    planned = build_mlx(source, tmp_path / "planned", bits="auto", plan={"size_mb": size / 1e6})
    assert 0.97 * size <= sum(f.stat().st_size for f in planned.path.iterdir()) <= size
    quantization = json.loads((planned.path / "config.json").read_text())["quantization"]
    kept = [path for path, entry in quantization.items() if isinstance(entry, dict) and entry["bits"] == 8
            and path not in planned.plan["tensors"]]
    assert "lm_head" in kept and any(path.endswith("o_proj") for path in kept)
    assert planned.plan["bits_per_weight"] > 3.5


def test_every_plan_reports_how_close_its_prediction_was():
    import siliconvert.commands.pipeline as pipeline
    from siliconvert.artifacts import Artifact
    from siliconvert.validate.report import plan_lines

    target = parse_recipe({"source": "x", "targets": [
        {"format": "gguf", "quants": ["auto"], "plan": {"size_mb": 3}}]}).targets[0]
    plan = make_plan(synthetic_costs(), QuantPlan(size_mb=3)).summary()
    artifact = Artifact("gguf", "auto-3mb", Path("demo-auto-3mb.gguf"), plan=plan)
    replan = pipeline.Replanner(None, parse_recipe({"source": "x", "targets": [target.model_dump()]}),
                                [(artifact, target)], Path("."), None)
    measured = 3 * plan["predicted_mean_kld"]
    entry = {"format": "gguf", "quant": "auto-3mb", "metrics": {"mean_kld": measured}, "size_bytes": 100}
    assert replan(artifact, entry) is None  # a size plan is not planned again
    assert entry["plan"]["measured_mean_kld"] == measured and entry["plan"]["measured_over_predicted"] == 3.0
    assert f"measured {measured:.5f} (3.00× the prediction)" in "\n".join(plan_lines([entry]))


def test_two_options_of_one_size_whose_errors_were_rescaled_out_of_order_plan():
    """GPTQ's share rescales MLX's affine errors after costing: 4-bit g64 (affine) can fall below nvfp4 of the same
    bytes, listed first. The planner once divided by their zero-byte difference (the real SmolLM2, 2026-12-07)."""
    options = (Option("3bit-g64", 300, 0.05), Option("nvfp4", 450, 0.02), Option("4bit-g64", 450, 0.01),
               Option("8bit-g64", 850, 0.0001))
    costs = [TensorCosts("a", 800, options), TensorCosts("b", 800, options)]
    by_size = make_plan(costs, QuantPlan(bits_per_weight=4.5, kld_per_error=0.1))
    assert set(o.kind for o in by_size.choices.values()) == {"4bit-g64"}  # never the worse of the same bytes
    by_quality = make_plan(costs, QuantPlan(max_mean_kld=0.0025, kld_per_error=0.1))
    assert "nvfp4" not in {o.kind for o in by_quality.choices.values()}
    assert make_plan([TensorCosts("c", 800, (Option("x", 100, 0.2), Option("y", 100, 0.1)))],
                     QuantPlan(bits_per_weight=2.0)).choices["c"].kind == "y"  # where a plan starts too
