"""Core ML compression beside GGUF Q4_K_M (issue #28's Core ML part): every fixed precision and a plan at Q4_K_M's
size, on the demo model and a family checkpoint, and the importance-fitted weights against plain ones.

For each model this runs recipes (`siliconvert recipe`'s own run, in this process): GGUF Q4_K_M (llama.cpp's
recipe, builtin importance matrix); Core ML int8, int4, every palette and `precision: auto` planned at Q4_K_M's
bytes, then planned at its weights' bits per weight; every artifact scored on the same windows against the same
float32 transformers reference (Core ML by the MIL interpreter). Then int4 and the palettes again, plain (the
pass's max/7 scales, k-means with every value weighing alike: the writer's column importance switched off in this
process), scored on the same windows; and once more rounded by GPTQ (`method: gptq`: the same tables and block
layout, each layer rounded a column at a time against its calibration inputs' second moments). Bits per weight are
the artifact's bytes × 8 over the checkpoint's parameters (everything the folder holds: tables, scales, the spec,
tokenizer files).

    .venv/bin/python -m bench.coreml_palettes [--only demo,qwen3] [--tokens 512] [--context 256]
                                              [--precisions int4,pal4,pal3] [--no-plan] [--gptq-plans]
                                              [--goals bytes,bits,q4-bits] [--label after-x]

`--precisions` keeps only those of the fixed, plain and GPTQ packages; `--no-plan` leaves out the planned ones.
`--gptq-plans` runs instead what issue #28 asks of Core ML at int4-class size: Q4_K_M, int4, int4-zp and pal4 by GPTQ
(or `--precisions`; `--precisions=`: none), and
`precision: auto` with `method: gptq` planned at Q4_K_M's bytes (equal bytes), at 4.5 bits per weight (the
planned weights' bytes over their values) and at Q4_K_M's weights' bits per weight where more (equal weight bytes),
each row with its ratio to Q4_K_M's mean KLD; `--goals` keeps only some of the three plans.

Writes bench/results/coreml-palettes-<YYYY-MM-DD>.json and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import yaml

from bench.plan import checkpoint_for
from bench.run import RESULTS_DIR, WORK_DIR

OUT = WORK_DIR / "coreml-palettes"
FIXED = ["int8", "int4", "pal8", "pal6", "pal4", "pal4-lut8", "pal3", "pal3-lut8", "pal2"]
PLAIN = ["int4", *(p for p in FIXED if p.startswith("pal"))]  # scored again without the importance
GPTQ = PLAIN  # and rounded by GPTQ against the calibration inputs' second moments
MODELS = ("demo", "qwen3")
GPTQ_FIXED = ["int4", "int4-zp", "pal4"]  # the int4-class packages rounded by GPTQ beside the plans
GPTQ_PLAN_BITS = 4.5  # the int4-class size: a plan of GPTQ-rounded weights at this many bits per weight


def label_of(model: str) -> str:
    """A model's name in folders and file names: a checkpoint folder's own name, else the model as given."""
    return Path(model).name if Path(model).is_dir() else model


def run(model: str, name: str, targets: list[dict], tokens: int, context: int) -> dict:
    """One recipe run in this process; its report.json."""
    from siliconvert.commands.pipeline import run_recipe
    from siliconvert.recipe import load_recipe

    folder = OUT / label_of(model) / name
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"name": f"{label_of(model)}-{name}", "source": str(checkpoint_for(model)), "output": str(folder / "out"),
              "targets": targets,
              "validate": {"tokens": tokens, "context": context, "latency": False,
                           "gates": {"max_mean_kld": 1.0, "min_same_top1": 0.0, "max_ppl_ratio": 10.0}}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(path), path)
    return json.loads((folder / "out" / "report.json").read_text())


def rows_of(report: dict, parameters: int, label: str = "") -> list[dict]:
    return [{"format": a["format"], "quant": a["quant"] + label, "bytes": a["size_bytes"],
             "bits_per_weight": round(a["size_bytes"] * 8 / parameters, 3),
             "mean_kld": a["metrics"]["mean_kld"], "same_top1": a["metrics"]["same_top1"]}
            for a in report["artifacts"] if a.get("metrics")]


def gguf_bits_per_weight(path: Path) -> float:
    """Bits per weight of a GGUF file's matrices (its quantized tensors' bytes over their values)."""
    from gguf import GGUFReader

    matrices = [t for t in GGUFReader(path).tensors if len(t.shape) > 1]
    return round(sum(int(t.n_bytes) for t in matrices) * 8 / sum(int(t.n_elements) for t in matrices), 3)


def measure(model: str, tokens: int, context: int, precisions: list[str] | None = None, planned: bool = True) -> dict:
    """The rows of one model: `precisions` (None: all) of the fixed, plain and GPTQ packages; the planned ones
    where `planned`."""
    kept = (lambda names: [p for p in names if p in precisions]) if precisions else list
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.convert.coreml import plan as coreml_plan

    checkpoint = Checkpoint.open(checkpoint_for(model))
    parameters = sum(math.prod(info.shape) for info in checkpoint.tensor_infos.values())
    anchor = run(model, "anchor", [{"format": "gguf", "quants": ["Q4_K_M"]}], tokens, context)
    (q4,) = [a for a in anchor["artifacts"] if a["quant"] == "Q4_K_M"]
    size_mb = q4["size_bytes"] / 1e6
    coreml = {"format": "coreml", "context": context, "precision": [*kept(FIXED), "auto"],
              "plan": {"size_mb": round(size_mb, 3)}}
    if not planned:
        coreml = {"format": "coreml", "context": context, "precision": kept(FIXED)}
    weighted = run(model, "weighted", [coreml], tokens, context)
    # and planned at Q4_K_M's bits per weight (its weights' bytes over their count), the Core ML package's spec and
    # tokenizer files aside: in the same folder, so the calibration and the reference are reused
    bits = gguf_bits_per_weight(Path(q4["path"]))
    at_bits = (run(model, "weighted", [{**coreml, "precision": ["auto"], "plan": {"bits_per_weight": bits}}], tokens,
                   context) if planned else {"artifacts": []})
    # rounded by GPTQ: in the same folder too (the reference, and the calibration's other parts, reused)
    gptq = run(model, "weighted", [{"format": "coreml", "context": context, "precision": kept(GPTQ), "method": "gptq"}],
               tokens, context)
    of = coreml_plan.ColumnImportance.of
    coreml_plan.ColumnImportance.of = lambda self, chunk, key, rows: None  # plain: no column weighs more
    try:
        plain = run(model, "plain", [{"format": "coreml", "context": context, "precision": kept(PLAIN)}], tokens,
                    context)
    finally:
        coreml_plan.ColumnImportance.of = of
    rows = rows_of(anchor, parameters) + rows_of(weighted, parameters)
    rows += [r for r in rows_of(at_bits, parameters) if r["quant"].startswith("auto")]
    rows += [r for r in rows_of(plain, parameters, " (plain)") if r["quant"] != "fp16 (plain)"]
    rows += [r for r in rows_of(gptq, parameters) if r["quant"] != "fp16"]
    q4_kld = q4["metrics"]["mean_kld"]
    result = {"model": label_of(model), "parameters": parameters, "rows": rows,
              "q4_k_m": {"bytes": q4["size_bytes"], "mean_kld": q4["metrics"]["mean_kld"], "bits_per_weight": bits}}
    within = [r for r in rows if r["format"] != q4["format"] and r["bytes"] <= q4["size_bytes"]]
    if within:
        best = min(within, key=lambda r: r["mean_kld"])
        result["best_at_q4_k_m_size"] = {**best, "over_q4_k_m": round(best["mean_kld"] / q4_kld, 3)}
    if planned:
        (planned_at_bits,) = [r for r in rows_of(at_bits, parameters) if r["quant"].startswith("auto")]
        result["planned_at_q4_k_m_bits"] = {**planned_at_bits,
                                            "over_q4_k_m": round(planned_at_bits["mean_kld"] / q4_kld, 3)}
    return result


def measure_gptq_plans(model: str, tokens: int, context: int, fixed: list[str] | None = None,
                       goals: list[str] | None = None) -> dict:
    """Q4_K_M beside Core ML's GPTQ-rounded packages: `fixed` (GPTQ_FIXED), and planned at Q4_K_M's bytes
    ("bytes"), at GPTQ_PLAN_BITS bits per weight ("bits"), and at Q4_K_M's weights' bits per weight where they are
    more ("q4-bits"): those of `goals` (all three by default)."""
    from siliconvert.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(checkpoint_for(model))
    parameters = sum(math.prod(info.shape) for info in checkpoint.tensor_infos.values())
    anchor = run(model, "anchor", [{"format": "gguf", "quants": ["Q4_K_M"]}], tokens, context)
    (q4,) = [a for a in anchor["artifacts"] if a["quant"] == "Q4_K_M"]
    gptq = {"format": "coreml", "context": context, "method": "gptq"}
    fixed = GPTQ_FIXED if fixed is None else fixed
    reports = [anchor, *([run(model, "gptq", [{**gptq, "precision": fixed}], tokens, context)] if fixed else [])]
    # equal bytes; the issue's int4-class size; and Q4_K_M's own weights' bits (more than 4.5 where its rows are too
    # narrow for its 256-blocks and fall back to larger types): the artifacts' other bytes aside
    q4_bits = gguf_bits_per_weight(Path(q4["path"]))
    plans = {"bytes": {"size_mb": round(q4["size_bytes"] / 1e6, 3)}, "bits": {"bits_per_weight": GPTQ_PLAN_BITS},
             **({"q4-bits": {"bits_per_weight": q4_bits}} if q4_bits > GPTQ_PLAN_BITS + 0.1 else {})}
    for goal, plan in plans.items():
        if goals and goal not in goals:
            continue
        reports.append(run(model, "gptq", [{**gptq, "precision": ["auto"], "plan": plan}], tokens, context))
    rows = {(r["format"], r["quant"]): r for report in reports for r in rows_of(report, parameters)
            if r["quant"] != "fp16"}
    for row in rows.values():
        row["over_q4_k_m"] = round(row["mean_kld"] / q4["metrics"]["mean_kld"], 3)
    plans = {a["quant"]: a["plan"] for report in reports for a in report["artifacts"] if a.get("plan")}
    for (_, quant), row in rows.items():
        if quant in plans:
            row |= {"planned_bits_per_weight": plans[quant]["bits_per_weight"], "types": plans[quant]["types"],
                    "predicted_mean_kld": plans[quant]["predicted_mean_kld"]}
    return {"model": label_of(model), "parameters": parameters, "rows": list(rows.values()),
            "q4_k_m": {"bytes": q4["size_bytes"], "mean_kld": q4["metrics"]["mean_kld"], "bits_per_weight": q4_bits}}


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        ratio = any("over_q4_k_m" in r for r in result["rows"])
        header = "| format | precision | bytes | bits/weight | mean KLD | same top-1 |"
        lines += [f"### {result['model']} ({result['parameters']:,} parameters)", "",
                  header + (" × Q4_K_M |" if ratio else ""), "|---|---|---|---|---|---|" + ("---|" if ratio else "")]
        lines += [f"| {r['format']} | {r['quant']} | {r['bytes']:,} | {r['bits_per_weight']} | {r['mean_kld']:.5f} | "
                  f"{r['same_top1']:.3f} |" + (f" {r.get('over_q4_k_m', '–')} |" if ratio else "")
                  for r in sorted(result["rows"], key=lambda r: r["bytes"])]
        lines.append("")
        if "best_at_q4_k_m_size" in result:
            best = result["best_at_q4_k_m_size"]
            lines.append(f"Best at Q4_K_M's size or less: {best['quant']} ({best['bytes']:,} bytes), mean KLD "
                         f"{best['mean_kld']:.5f} = {best['over_q4_k_m']}× Q4_K_M's.")
        if "planned_at_q4_k_m_bits" in result:
            planned = result["planned_at_q4_k_m_bits"]
            lines.append(f"Planned at Q4_K_M's {result['q4_k_m']['bits_per_weight']} bits per weight: "
                         f"{planned['mean_kld']:.5f} = {planned['over_q4_k_m']}× Q4_K_M's.")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only",
                        help="comma-separated models (demo, real, a tests/families.py family, a checkpoint folder)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--precisions", help="comma-separated: only these of the fixed, plain and GPTQ packages")
    parser.add_argument("--no-plan", action="store_true", help="leave out the planned packages")
    parser.add_argument("--gptq-plans", action="store_true",
                        help="Q4_K_M beside Core ML by GPTQ: int4, int4-zp, pal4 (or --precisions), planned at "
                             "Q4_K_M's bytes, at 4.5 bits and at Q4_K_M's weights' bits (or --goals)")
    parser.add_argument("--goals", help="with --gptq-plans, comma-separated: only these plans (bytes, bits, q4-bits)")
    parser.add_argument("--label", help="appended to the result's file name (a run after a change, beside one before)")
    args = parser.parse_args()
    models = args.only.split(",") if args.only else MODELS
    # `--precisions=` (none): with --gptq-plans, the plans alone
    precisions = [p for p in args.precisions.split(",") if p] if args.precisions is not None else None
    goals = args.goals.split(",") if args.goals else None
    results = [measure_gptq_plans(model, args.tokens, args.context, precisions, goals) if args.gptq_plans
               else measure(model, args.tokens, args.context, precisions, not args.no_plan) for model in models]
    stamp = datetime.date.today().isoformat() + (f"-only-{'-'.join(map(label_of, models))}" if args.only else "")
    stamp += f"-{'-'.join(precisions)}" if precisions else ""
    stamp += "-no-plan" if args.no_plan else ""
    stamp += "-gptq-plans" if args.gptq_plans else ""
    stamp += f"-{'-'.join(goals)}" if goals else ""
    stamp += f"-{args.label}" if args.label else ""
    out = Path(RESULTS_DIR) / f"coreml-palettes-{stamp}.json"
    out.write_text(json.dumps({"tokens": args.tokens, "context": args.context, "models": results}, indent=1) + "\n")
    print(markdown(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
