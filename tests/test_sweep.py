"""The sweep's targets and its front (table and plot), from a report; and what it refuses. Fast: no model runs."""

from __future__ import annotations

import json

import pytest

from siliconvert.commands.cli import main
from siliconvert.commands.sweep import fixed_targets, planned_targets, sweep_front, write_sweep
from siliconvert.recipe import parse_recipe

RECIPE = {"source": "x", "targets": [{"format": "gguf", "quants": ["Q4_K_M"], "imatrix": "builtin"},
                                     {"format": "mlx", "bits": 4}],
          "validate": {"gates": {"max_mean_kld": 0.01}}}


def entry(fmt: str, quant: str, size: int, kld: float, plan: dict | None = None) -> dict:
    return {"format": fmt, "quant": quant, "size_bytes": size, "plan": plan,
            "metrics": {"mean_kld": kld, "same_top1": 0.95}}


FIXED_REPORT = {"source": "x", "source_info": {"name": "demo"},
                "corpus": {"name": "builtin", "positions": 1020},
                "artifacts": [entry("gguf", "Q3_K_M", 2_900_000, 0.004), entry("gguf", "Q4_K_M", 3_400_000, 0.0012),
                              entry("gguf", "Q5_K_M", 3_900_000, 0.0004), entry("mlx", "3bit-g64", 2_800_000, 0.02),
                              entry("mlx", "4bit-g64", 3_400_000, 0.005), entry("mlx", "6bit-g64", 4_500_000, 0.001),
                              entry("mlx", "mixed_3_6-g64", 3_000_000, 0.01)]}


def test_the_fixed_recipes_are_the_anchors():
    targets = fixed_targets(parse_recipe(RECIPE))
    assert targets[0].quants == ["IQ2_XXS", "IQ2_M", "IQ3_XXS", "IQ3_M", "Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M"]
    assert targets[0].imatrix == "builtin"
    assert [t.quant for t in targets[1:]] == ["3bit-g64", "4bit-g64", "6bit-g64", "mixed_3_6-g64", "mixed_4_6-g64"]


def test_the_sweeps_mlx_folders_run_the_model_file_the_recipe_asks_for():
    """A recipe that ships siliconvert's model file (mlx-lm's is refused for such a family) sweeps with it too."""
    recipe = parse_recipe(RECIPE | {"targets": [{"format": "mlx", "bits": 4, "model_file": "faithful"}]})
    swept = [t for t in fixed_targets(recipe) + planned_targets(recipe, FIXED_REPORT) if t.format == "mlx"]
    assert swept and {t.model_file for t in swept} == {"faithful"}
    assert {t.model_file for t in fixed_targets(parse_recipe(RECIPE)) if t.format == "mlx"} == {"mlx-lm"}


def test_plans_aim_at_the_fixed_sizes_the_anchors_kld_and_the_gate():
    labels = [(t.format, t.plan.label) for t in planned_targets(parse_recipe(RECIPE), FIXED_REPORT)]
    assert labels == [("gguf", "auto-2.9MB"), ("gguf", "auto-3.4MB"), ("gguf", "auto-kld0.0012"),
                      ("gguf", "auto-3.9MB"), ("gguf", "auto-kld0.01"),
                      ("mlx", "auto-2.8MB"), ("mlx", "auto-3.4MB"), ("mlx", "auto-kld0.005"),
                      ("mlx", "auto-4.5MB"), ("mlx", "auto-kld0.01")]


def test_plans_leave_the_i_quant_recipes_to_the_front():
    """The i-quant recipes are drawn on the front; plans aim at the K recipes' sizes only (an i-quant is a candidate
    of every plan already)."""
    report = FIXED_REPORT | {"artifacts": [entry("gguf", "IQ3_M", 2_700_000, 0.006), *FIXED_REPORT["artifacts"]]}
    labels = [t.plan.label for t in planned_targets(parse_recipe(RECIPE), report) if t.format == "gguf"]
    assert labels == ["auto-2.9MB", "auto-3.4MB", "auto-kld0.0012", "auto-3.9MB", "auto-kld0.01"]


def test_the_front_is_a_table_and_a_plot(tmp_path):
    plan = {"goal": {"size_mb": 3.4}, "predicted_mean_kld": 0.0008, "bits_per_weight": 4.4, "tries": [{}]}
    planned = [entry("gguf", "auto-3.4MB", 3_399_000, 0.0007, plan)]
    front = sweep_front(FIXED_REPORT["artifacts"] + planned, FIXED_REPORT, gate=0.01)
    write_sweep(tmp_path, front)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["quant"] for r in saved["rows"] if r["format"] == "gguf"] == ["Q3_K_M", "auto-3.4MB", "Q4_K_M",
                                                                             "Q5_K_M"]
    row = next(r for r in saved["rows"] if r["kind"] == "planned")
    assert row["goal"] == {"size_mb": 3.4} and row["tries"] == 1
    table = (tmp_path / "sweep.md").read_text()
    assert "| gguf | auto-3.4MB | planned | 3.399 MB | 0.00070 | 0.00080 | 4.40 |" in table
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_a_sweep_needs_a_gguf_or_mlx_target(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: builtin:demo\ntargets: [{format: coreml}]\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(recipe)])
    assert exit_info.value.code == 2
    assert "a sweep needs a target in mlx or gguf" in capsys.readouterr().err
