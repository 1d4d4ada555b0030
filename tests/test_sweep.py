"""The sweep's targets and its front (table and plot), from a report; and what it refuses. Fast: no model runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from siliconvert.commands.cli import main
from siliconvert.commands.sweep import (
    fixed_targets,
    planned_runs,
    planned_targets,
    sweep_front,
    unfit_quants,
    write_sweep,
)
from siliconvert.format import register, unregister
from siliconvert.recipe import parse_recipe
from tests.test_formats import Toy

RECIPE = {"source": "x", "targets": [{"format": "gguf", "quants": ["Q4_K_M"], "imatrix": "builtin"},
                                     {"format": "mlx", "bits": 4}],
          "validate": {"gates": {"max_mean_kld": 0.01}}}
COREML = {"format": "coreml", "context": 256, "chunks": 1}


def checkpoint(widths: list[int], experts: bool = False) -> SimpleNamespace:
    """What sweep_unfit reads of a checkpoint: its spec's experts and its tensors' shapes."""
    infos = {f"w{i}": SimpleNamespace(shape=(64, width)) for i, width in enumerate(widths)}
    infos["norm"] = SimpleNamespace(shape=(widths[0],))
    return SimpleNamespace(spec=SimpleNamespace(experts=object() if experts else None), tensor_infos=infos)


def entry(fmt: str, quant: str, size: int, kld: float, plan: dict | None = None) -> dict:
    return {"format": fmt, "quant": quant, "size_bytes": size, "plan": plan,
            "metrics": {"mean_kld": kld, "same_top1": 0.95}}


FIXED_REPORT = {"source": "x", "source_info": {"name": "demo"},
                "corpus": {"name": "builtin", "positions": 1020},
                "artifacts": [entry("gguf", "Q3_K_M", 2_900_000, 0.004), entry("gguf", "Q4_K_M", 3_400_000, 0.0012),
                              entry("gguf", "Q5_K_M", 3_900_000, 0.0004), entry("mlx", "3bit-g64", 2_800_000, 0.02),
                              entry("mlx", "4bit-g64", 3_400_000, 0.005), entry("mlx", "6bit-g64", 4_500_000, 0.001),
                              entry("mlx", "mixed_3_6-g64", 3_000_000, 0.01)]}


def test_the_fixed_recipes_are_every_type_of_each_format():
    targets = fixed_targets(parse_recipe(RECIPE | {"targets": [*RECIPE["targets"], COREML]}))
    assert targets[0].quants == ["TQ1_0", "IQ2_XXS", "TQ2_0", "Q2_K", "IQ2_M", "IQ3_XXS", "IQ3_M", "Q3_K_M", "IQ4_XS",
                                 "Q4_0", "IQ4_NL", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "MXFP4_MOE"]
    assert targets[0].imatrix == "builtin"
    mlx = [t for t in targets if t.format == "mlx"]
    assert [t.quant for t in mlx] == ["3bit-g64", "4bit-g64", "6bit-g64", "8bit-g64", "mixed_3_6-g64",
                                      "mixed_4_6-g64", "3bit-g64-gptq", "4bit-g64-gptq", "4bit-g64-clip", "mxfp4",
                                      "nvfp4", "mxfp8"]
    assert [t.bits_and_group for t in mlx if t.mode != "affine"] == [(4, 32), (4, 16), (8, 32)]
    (coreml,) = [t for t in targets if t.format == "coreml"]  # one target: every precision beside its fp16 package
    assert coreml.precisions == ["fp16", "int8", "int4", "int4-zp", "pal8", "pal6", "pal6-lut8", "pal4", "pal4-lut8",
                                 "pal3", "pal3-lut8", "pal2", "pal2-lut8"]
    assert (coreml.context, coreml.chunks) == (256, 1)  # the recipe's packaging
    only = fixed_targets(parse_recipe(RECIPE | {"targets": [*RECIPE["targets"], COREML]}), ["Q4_K_M", "int4"])
    assert [(t.format, t.asked if t.format == "coreml" else t.quants) for t in only] == [
        ("gguf", ["Q4_K_M"]), ("coreml", ["int4"])]


def test_types_a_model_cannot_take_are_skipped_with_the_reason():
    """MXFP4_MOE on a model without experts, and a type whose blocks no weight's rows fill (llama.cpp would write
    its fallback throughout): not built, the reason on the front."""
    recipe = parse_recipe(RECIPE)
    dense_128 = unfit_quants(recipe, checkpoint([128, 384]))
    reasons = {row["quant"]: row["reason"] for row in dense_128}
    assert set(reasons) == {"MXFP4_MOE", "TQ1_0", "TQ2_0", "IQ2_XXS", "Q2_K", "IQ3_XXS", "IQ4_XS", "Q6_K"}
    assert reasons["MXFP4_MOE"].startswith("no expert stacks")
    assert reasons["TQ1_0"] == ("no weight's rows fill TQ1_0's blocks of 256 (rows of 128, 384): llama.cpp would "
                                "write every tensor in a fallback type")
    assert unfit_quants(recipe, checkpoint([256, 768], experts=True)) == []  # one row filling a block is enough
    targets = fixed_targets(recipe, skipped=dense_128)
    assert "TQ1_0" not in targets[0].quants and "Q4_K_M" in targets[0].quants and "IQ4_NL" in targets[0].quants


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


def test_plans_leave_the_other_types_to_the_front():
    """The i-quant, ternary, GPTQ and float-mode recipes and Core ML's other types are drawn on the front; plans aim
    at the K recipes', the affine widths' and Core ML's int4-class sizes only (the rest are plan candidates
    already)."""
    others = [entry("mlx", "4bit-g64-gptq", 3.4e6, 0.002), entry("mlx", "nvfp4", 3.6e6, 0.003),
              entry("mlx", "8bit-g64", 6e6, 1e-4), entry("coreml", "fp16", 11e6, 1e-6),
              entry("coreml", "int8", 6e6, 1e-5), entry("coreml", "int4", 3.6e6, 0.0034),
              entry("coreml", "pal4", 3.3e6, 0.004)]
    report = FIXED_REPORT | {"artifacts": [entry("gguf", "IQ3_M", 2_700_000, 0.006), entry("gguf", "Q6_K", 4.4e6, 2e-4),
                                           *FIXED_REPORT["artifacts"], *others]}
    recipe = parse_recipe(RECIPE | {"targets": [*RECIPE["targets"], COREML]})
    planned = planned_targets(recipe, report)
    assert [t.plan.label for t in planned if t.format == "gguf"] == ["auto-2.9MB", "auto-3.4MB", "auto-kld0.0012",
                                                                    "auto-3.9MB", "auto-kld0.01"]
    assert [t.plan.label for t in planned if t.format == "mlx"] == ["auto-2.8MB", "auto-3.4MB", "auto-kld0.005",
                                                                   "auto-4.5MB", "auto-kld0.01"]
    coreml = [t for t in planned if t.format == "coreml"]
    assert [t.plan.label for t in coreml] == ["auto-3.6MB", "auto-kld0.0034", "auto-3.3MB", "auto-kld0.01"]
    assert all(t.asked == ["auto"] and (t.context, t.chunks) == (256, 1) for t in coreml)  # the recipe's packaging


def test_coreml_plans_take_the_recipes_method_and_a_run_each():
    """A Core ML target rounding by GPTQ names its fixed packages int4-gptq…: its plans aim at them all the same, and
    round by GPTQ too. Every Core ML target builds the fp16 package, so the sweep builds its plans a run each, the
    first beside the other formats' plans."""
    recipe = parse_recipe(RECIPE | {"targets": [*RECIPE["targets"], COREML | {"precision": ["int4"],
                                                                             "method": "gptq"}]})
    report = FIXED_REPORT | {"artifacts": [*FIXED_REPORT["artifacts"], entry("coreml", "int4-gptq", 3.6e6, 0.002),
                                           entry("coreml", "pal4-gptq", 3.3e6, 0.0015),
                                           entry("coreml", "pal2-gptq", 2e6, 0.05)]}
    planned = planned_targets(recipe, report)
    coreml = [t for t in planned if t.format == "coreml"]
    assert [t.plan.label for t in coreml] == ["auto-3.6MB", "auto-kld0.002", "auto-3.3MB", "auto-kld0.01"]
    assert {t.method for t in coreml} == {"gptq"} and coreml[0].variant(coreml[0].plan.label) == "auto-3.6MB-gptq"
    runs = planned_runs(planned)
    assert [[t.format for t in run] for run in runs] == [["gguf"] * 5 + ["mlx"] * 5 + ["coreml"], ["coreml"],
                                                        ["coreml"], ["coreml"]]
    assert [t for run in runs for t in run if t.format == "coreml"] == coreml
    assert planned_runs([]) == []


def test_the_front_is_a_table_and_a_plot(tmp_path):
    plan = {"goal": {"size_mb": 3.4}, "predicted_mean_kld": 0.0008, "bits_per_weight": 4.4, "tries": [{}]}
    planned = [entry("gguf", "auto-3.4MB", 3_399_000, 0.0007, plan),
               entry("coreml", "auto-3.4MB-gptq", 3_398_000, 0.0003, plan)]
    skipped = [{"format": "gguf", "quant": "MXFP4_MOE", "reason": "no expert stacks"}]
    front = sweep_front(FIXED_REPORT["artifacts"] + planned, FIXED_REPORT, gate=0.01, skipped=skipped)
    write_sweep(tmp_path, front)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["skipped"] == skipped
    assert [r["quant"] for r in saved["rows"] if r["format"] == "gguf"] == ["Q3_K_M", "auto-3.4MB", "Q4_K_M",
                                                                             "Q5_K_M"]
    row = next(r for r in saved["rows"] if r["kind"] == "planned")
    assert row["goal"] == {"size_mb": 3.4} and row["tries"] == 1
    table = (tmp_path / "sweep.md").read_text()
    assert "| gguf | auto-3.4MB | planned | 3.399 MB | 0.00070 | 0.00080 | 4.40 |" in table
    assert "| coreml | auto-3.4MB-gptq | planned | 3.398 MB | 0.00030 | 0.00080 | 4.40 |" in table
    assert "- gguf MXFP4_MOE: no expert stacks" in table
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_a_sweep_needs_a_format_with_fixed_recipes(tmp_path, capsys):
    register(Toy())  # a format entry with no fixed recipes to compare with
    try:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("source: builtin:demo\ntargets: [{format: toy}]\n")
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", str(recipe)])
    finally:
        unregister("toy")
    assert exit_info.value.code == 2
    assert "a sweep needs a target in mlx or gguf or coreml" in capsys.readouterr().err
