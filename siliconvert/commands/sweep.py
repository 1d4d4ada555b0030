"""`siliconvert sweep recipe.yaml`: the size-vs-KLD front of planned artifacts beside the fixed recipes.

For each of the recipe's targets' formats it builds every fixed type the format entry lists (`fixed_quants`: GGUF's
K-, i-, ternary and MXFP4 types with the same importance matrix a plan uses; MLX affine widths at group 64, mlx-lm's
mixed recipes, GPTQ and the float modes; Core ML int8, int4 and the palettes) but those the model cannot take
(`sweep_unfit`: skipped, the reason recorded), and scores them with the project's own validation; then planned
artifacts aimed at their figures (one at each of the format's `planned_at` types' byte sizes: as small and better;
one at the measured mean KLD of its anchor, Q4_K_M, MLX 4-bit g64 or Core ML int4: as good and smaller) and at the
recipe's mean-KLD gate, scored the same way. A format whose targets share an artifact (`one_target_a_run`: Core ML's
fp16 package) builds its second and later plans a run each (`planned_runs`). The front goes to sweep.json, sweep.md
and sweep.png (a marker per format; fixed types as points, each format's plans as a line).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from siliconvert.artifacts import write_text_atomically
from siliconvert.calibration import Calibrations
from siliconvert.checkpoint import Checkpoint
from siliconvert.commands.pipeline import (
    Replanner,
    Timings,
    convert,
    open_source,
    preflight,
    prepare_output,
    validate_artifacts,
)
from siliconvert.errors import RecipeError
from siliconvert.format import Format
from siliconvert.format import entries as format_entries
from siliconvert.format import entry as format_entry
from siliconvert.progress import say
from siliconvert.recipe import QuantPlan, Recipe, TargetSpec


def swept(recipe: Recipe) -> list[Format]:
    """The formats of the recipe's targets that a sweep builds (those with fixed recipes to compare with), in the
    recipe's order."""
    asked = [format_entry(name) for name in dict.fromkeys(target.format for target in recipe.targets)]
    return [fmt for fmt in asked if fmt.fixed_quants]


def fixed_targets(recipe: Recipe, only: Sequence[str] | None = None,
                  skipped: Sequence[dict] = ()) -> list[TargetSpec]:
    """The fixed recipes of the recipe's formats; `only` keeps those named (Q4_K_M, 4bit-g64, mixed_3_6-g64),
    `skipped` (unfit_quants' rows) leaves those out."""
    left_out = {(row["format"], row["quant"]) for row in skipped}
    targets: list[TargetSpec] = []
    for fmt in swept(recipe):
        quants = [quant for quant in fmt.fixed_quants
                  if (only is None or quant in only) and (fmt.name, quant) not in left_out]
        targets += fmt.sweep_fixed([t for t in recipe.targets if t.format == fmt.name], quants)
    return targets


def unfit_quants(recipe: Recipe, checkpoint: Checkpoint, only: Sequence[str] | None = None) -> list[dict]:
    """The fixed recipes this model cannot take, each {format, quant, reason}: a sweep skips them."""
    return [{"format": fmt.name, "quant": quant, "reason": reason}
            for fmt in swept(recipe) for quant in fmt.fixed_quants
            if (only is None or quant in only) and (reason := fmt.sweep_unfit(checkpoint, quant)) is not None]


def planned_targets(recipe: Recipe, fixed_report: dict) -> list[TargetSpec]:
    """Per format: a plan at each fixed artifact's byte size, one at its measured mean KLD (the two ways to
    beat it: as good and smaller, or as small and better), and one at the recipe's max_mean_kld gate."""
    gate = recipe.validate_.gates.max_mean_kld
    goals: dict[str, dict[str, QuantPlan]] = {fmt.name: {} for fmt in swept(recipe)}  # format → label → plan
    for entry in fixed_report["artifacts"]:
        fmt = format_entry(entry["format"])
        if not fmt.aims_at(entry["quant"]):
            continue
        plans = [QuantPlan(size_mb=round(entry["size_bytes"] / 1e6, 3))]
        if fmt.is_anchor(entry["quant"]):
            plans.append(QuantPlan(max_mean_kld=float(f"{entry['metrics']['mean_kld']:.3g}")))
        goals.setdefault(fmt.name, {}).update({plan.label: plan for plan in plans})
    targets: list[TargetSpec] = []
    for name, plans in goals.items():
        if not plans:
            continue
        if gate is not None:
            plans.setdefault(QuantPlan(max_mean_kld=gate).label, QuantPlan(max_mean_kld=gate))
        fmt, own = format_entry(name), [t for t in recipe.targets if t.format == name]
        targets += [fmt.sweep_planned(own, plan) for plan in plans.values()]
    return targets


def planned_runs(targets: Sequence[TargetSpec]) -> list[list[TargetSpec]]:
    """The planned targets as the runs that build them: every one in the first run, but the second and later
    targets of a format that builds one a run (`one_target_a_run`), each in a run of its own."""
    first: list[TargetSpec] = []
    alone: list[list[TargetSpec]] = []
    for target in targets:
        fmt = format_entry(target.format)
        if fmt.one_target_a_run and any(other.format == target.format for other in first):
            alone.append([target])
        else:
            first.append(target)
    return [first, *alone] if first else []


def run_sweep(recipe: Recipe, recipe_path: Path | None = None, *, allow_pickle: bool = False,
              only: Sequence[str] | None = None) -> dict:
    """Build and score the fixed recipes, then the plans their figures call for; tabulate. Returns the front
    (what sweep.json holds). The fixed and the planned reports go to sweep/fixed/ and sweep/planned/."""
    sweepable = [fmt.name for fmt in format_entries() if fmt.fixed_quants]
    if not swept(recipe):
        raise RecipeError(f"a sweep needs a target in {' or '.join(sweepable)}", recipe_path or "recipe")
    known = [quant for fmt in swept(recipe) for quant in fmt.fixed_quants]
    unknown = [name for name in only or () if name not in known]
    if unknown:
        raise RecipeError(f"--fixed: {', '.join(unknown)} is not a fixed recipe of the sweep ({', '.join(known)})",
                          "command line")
    checkpoint = open_source(recipe.source, allow_pickle)
    preflight(recipe, checkpoint, recipe_path)
    sweep_dir = prepare_output(recipe.output_dir(recipe_path) / "sweep")
    artifacts_dir, timings, settings = sweep_dir / "artifacts", Timings(), recipe.validate_
    skipped = unfit_quants(recipe, checkpoint, only)
    for row in skipped:
        say(f"sweep: {row['format']} {row['quant']} skipped: {row['reason']}")
    fixed_recipe = recipe.model_copy(update={"targets": fixed_targets(recipe, only, skipped)})
    say(f"sweep: {len(fixed_recipe.targets)} fixed targets → {sweep_dir}")
    # one calibration for both passes and the re-plans, cached with the reference logits
    calibration = Calibrations(checkpoint, sweep_dir / "fixed" / ".cache")
    fixed = [artifact for artifact, _ in convert(checkpoint, fixed_recipe, artifacts_dir, timings,
                                                 calibration=calibration)]
    fixed_report = validate_artifacts(checkpoint, recipe.source, fixed, settings,
                                      dict.fromkeys((a.path for a in fixed), settings.gates),
                                      prepare_output(sweep_dir / "fixed"), timings)
    planned_recipe = recipe.model_copy(update={"targets": planned_targets(recipe, fixed_report)})
    say(f"sweep: {len(planned_recipe.targets)} planned targets")
    produced = [made for targets in planned_runs(planned_recipe.targets)
                for made in convert(checkpoint, recipe.model_copy(update={"targets": targets}), artifacts_dir, timings,
                                    calibration=calibration)]
    planned_dir = prepare_output(sweep_dir / "planned")
    if not (planned_dir / ".cache").exists():  # the reference logits the fixed run computed
        (planned_dir / ".cache").symlink_to(sweep_dir / "fixed" / ".cache", target_is_directory=True)
    # a planned target may build a fixed artifact again (Core ML's fp16 package, its plans' source): scored once
    scored = {a.path for a in fixed}
    planned = [a for a, _ in produced if a.plan is not None or a.path not in scored]
    planned_report = validate_artifacts(checkpoint, recipe.source, planned, settings,
                                        {a.path: settings.gates for a in planned}, planned_dir, timings,
                                        replan=Replanner(checkpoint, planned_recipe, produced, artifacts_dir, timings,
                                                         calibration=calibration))
    timings.write(sweep_dir)
    front = sweep_front(fixed_report["artifacts"] + planned_report["artifacts"], fixed_report,
                        gate=settings.gates.max_mean_kld, skipped=skipped)
    write_sweep(sweep_dir, front)
    return front


def sweep_front(entries: list[dict], report: dict, gate: float | None, skipped: Sequence[dict] = ()) -> dict:
    """The rows of the front (fixed and planned report `entries`), with `report`'s source and corpus, and the fixed
    recipes `skipped` (unfit_quants)."""
    rows = [{"format": a["format"], "quant": a["quant"], "kind": "planned" if a.get("plan") else "fixed",
             "size_bytes": a["size_bytes"], "mean_kld": a["metrics"]["mean_kld"],
             "same_top1": a["metrics"]["same_top1"],
             "predicted_mean_kld": a["plan"]["predicted_mean_kld"] if a.get("plan") else None,
             "bits_per_weight": a["plan"]["bits_per_weight"] if a.get("plan") else None,
             "goal": a["plan"].get("goal") if a.get("plan") else None,
             "tries": len(a["plan"].get("tries", [])) if a.get("plan") else None}
            for a in entries]
    rows.sort(key=lambda r: (r["format"], r["size_bytes"]))
    return {"source": report["source"], "model": report["source_info"]["name"], "corpus": report["corpus"],
            "max_mean_kld": gate, "rows": rows, "skipped": list(skipped)}


def write_sweep(out_dir: Path, front: dict) -> None:
    write_text_atomically(out_dir / "sweep.json", json.dumps(front, indent=2) + "\n")
    lines = [f"# siliconvert sweep: {front['model']}", "",
             f"Mean KLD to the reference on {front['corpus']['positions']} positions of {front['corpus']['name']}, "
             "against size. *fixed*: the anchors' recipes; *planned*: siliconvert's per-tensor plans at the fixed "
             "recipes' sizes and at the recipe's mean-KLD gate.", "",
             "| format | artifact | kind | size | mean KLD | predicted | bits/weight | same top-1 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in front["rows"]:
        predicted = "–" if r["predicted_mean_kld"] is None else f"{r['predicted_mean_kld']:.5f}"
        bpw = "–" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
        lines.append(f"| {r['format']} | {r['quant']} | {r['kind']} | {r['size_bytes'] / 1e6:.3f} MB "
                     f"| {r['mean_kld']:.5f} | {predicted} | {bpw} | {100 * r['same_top1']:.1f} % |")
    if front.get("skipped"):
        lines += ["", "Fixed recipes this model cannot take, skipped:", ""]
        lines += [f"- {row['format']} {row['quant']}: {row['reason']}" for row in front["skipped"]]
    lines += ["", "![size against mean KLD](sweep.png)"]
    write_text_atomically(out_dir / "sweep.md", "\n".join(lines) + "\n")
    plot_front(out_dir / "sweep.png", front)


def plot_front(path: Path, front: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(figsize=(11, 6.5))
    markers = iter("osD^vP")
    for fmt in dict.fromkeys(r["format"] for r in front["rows"]):
        marker, color = next(markers, "o"), None
        for kind in ("fixed", "planned"):
            rows = [r for r in front["rows"] if r["format"] == fmt and r["kind"] == kind]
            if not rows:
                continue
            sizes, klds = [r["size_bytes"] / 1e6 for r in rows], [max(r["mean_kld"], 1e-8) for r in rows]
            if kind == "fixed":  # each fixed type a point: they are choices, not a curve
                (drawn,) = axes.plot(sizes, klds, marker=marker, markersize=6, linestyle="none", color=color,
                                     markerfacecolor="none", label=f"{fmt} fixed types")
            else:  # the format's plans, a front by size
                (drawn,) = axes.plot(sizes, klds, marker=marker, markersize=7, linestyle="-", color=color,
                                     label=f"{fmt} planned")
            color = drawn.get_color()
            for r, size, kld in zip(rows, sizes, klds, strict=True):
                axes.annotate(r["quant"], (size, kld), fontsize=5.5, xytext=(3, 3), textcoords="offset points",
                              color=color)
    if front["max_mean_kld"] is not None:
        axes.axhline(front["max_mean_kld"], color="red", linestyle="--", linewidth=1, label="gate: max mean KLD")
    axes.set(xlabel="size (MB)", ylabel="mean KLD to reference", yscale="log", xscale="log",
             title=f"{front['model']}: size against quality")
    axes.xaxis.set_major_formatter(ScalarFormatter())  # sizes as numbers, not powers of ten
    axes.xaxis.set_minor_formatter(ScalarFormatter())
    axes.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
