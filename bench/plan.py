"""Planned quantization against the fixed recipes (issue #17), on the demo model and small family checkpoints.

For each model this runs `siliconvert sweep` (fixed recipes: llama.cpp's Q3_K_M, Q4_K_M, Q5_K_M with the builtin
importance matrix, MLX 3/4/6-bit g64, mlx-lm's mixed_3_6 / mixed_4_6; plans at each one's size and measured mean
KLD, and at the gate), then checks the issue's figures:

- at Q4_K_M's byte size, the planned GGUF's mean KLD against Q4_K_M's (target ≤ 0.8×);
- at MLX 4-bit g64's size, the planned MLX model's against that (target ≤ 0.6×);
- every max_mean_kld plan: does it meet its target, and is it no larger than the smallest fixed recipe of its
  format that meets the same target;
- the estimator: measured mean KLD of each fixed recipe over its summed relative error (quantize/sensitivity.py),
  the fit KLD_PER_ERROR stands for.

The family checkpoints are tests/families.py's cases, as the tests build them (hidden size 128: no row holds a
whole 256-block, so llama.cpp's fixed recipes fall back to its 32-block types, and a plan chooses among those).

    .venv/bin/python -m bench.plan [--only demo,qwen3] [--tokens 512] [--context 256] [--reuse]

Writes bench/results/plan-<YYYY-MM-DD>.json and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from bench.run import RESULTS_DIR, WORK_DIR

OUT = WORK_DIR / "plan"
FAMILIES = ("qwen3", "olmo2", "granite")
# MLX runs on a slow CPU backend here (two minutes an artifact on this machine): the sweeps leave out some MLX widths
DEMO_FIXED = "Q3_K_M,Q4_K_M,Q5_K_M,4bit-g64,6bit-g64,mixed_4_6-g64"
FAMILY_FIXED = "Q3_K_M,Q4_K_M,Q5_K_M,4bit-g64"
GATE = 0.01


def checkpoint_for(model: str) -> Path:
    """"demo", a family of tests/families.py, "real" (SmolLM2-135M-Instruct: siliconvert/realweights.py), or a
    checkpoint folder."""
    from siliconvert.demo import demo_checkpoint, small_checkpoint
    from siliconvert.realweights import real_checkpoint
    from tests.families import FAMILY_CASES

    if model == "demo":
        return demo_checkpoint()
    if model == "real":
        return real_checkpoint()
    if model not in FAMILY_CASES and Path(model).expanduser().is_dir():  # "~/…" given after a comma stays unexpanded
        return Path(model).expanduser()
    if model not in FAMILY_CASES:
        raise SystemExit(f"{model}: neither demo, real, a family of tests/families.py nor a checkpoint folder")
    tokenizer, config = FAMILY_CASES[model]
    return small_checkpoint(None, model, tokenizer, config=config)


def sweep(model: str, source: Path, tokens: int, context: int, reuse: bool, fixed: str | None) -> dict:
    folder = OUT / model
    if reuse and (folder / "sweep" / "sweep.json").is_file():
        return json.loads((folder / "sweep" / "sweep.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"name": model, "source": str(source), "output": str(folder),
              "targets": [{"format": "gguf", "quants": ["Q4_K_M"], "imatrix": "builtin"},
                          {"format": "mlx", "bits": 4, "group_size": 64}],
              "validate": {"tokens": tokens, "context": context, "latency": False,
                           "gates": {"max_mean_kld": GATE}}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    log = folder / "sweep.log"
    with log.open("w") as out:
        command = [str(Path(sys.executable).with_name("siliconvert")), "sweep", str(folder / "recipe.yaml")]
        done = subprocess.run([*command, *(["--fixed", fixed] if fixed else [])],
                              stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"sweep of {model} failed ({log}): {' / '.join(tail)}")
    return json.loads((folder / "sweep" / "sweep.json").read_text())


def estimator_fit(source: Path, folder: Path) -> list[dict]:
    """Per fixed artifact: measured mean KLD, summed relative error of its types, and their ratio."""
    import shutil

    from siliconvert.calibration import Calibrations
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.convert.gguf import GGUFWriter
    from siliconvert.convert.mlx import MLXWriter
    from siliconvert.quantize.sensitivity import error_of, gguf_kinds, mlx_kinds
    from siliconvert.recipe import GGUFTarget, MLXTarget

    checkpoint = Checkpoint.open(source)
    scratch = folder / "costs"
    plan = {"bits_per_weight": 4}
    calibration = Calibrations(checkpoint, None)  # one forward for both writers
    writers = {"gguf": GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["auto"], imatrix="builtin", plan=plan),
                                  scratch, "costs", calibration=calibration),
               "mlx": MLXWriter(checkpoint, MLXTarget(format="mlx", bits="auto", plan=plan), scratch, "costs",
                                calibration=calibration)}
    costs = {fmt: writer.costs for fmt, writer in writers.items()}
    for writer in writers.values():
        writer.abort()
    shutil.rmtree(scratch, ignore_errors=True)
    report = json.loads((folder / "sweep" / "fixed" / "report.json").read_text())
    rows = []
    for entry in report["artifacts"]:
        path = Path(entry["path"])
        kinds = gguf_kinds(path) if entry["format"] == "gguf" else mlx_kinds(path)
        error = error_of(costs[entry["format"]], kinds)
        rows.append({"artifact": f"{entry['format']} {entry['quant']}", "mean_kld": entry["metrics"]["mean_kld"],
                     "summed_error": round(error, 6), "kld_per_error": round(entry["metrics"]["mean_kld"] / error, 5)})
    return rows


def figures(model: str, front: dict) -> dict:
    rows = front["rows"]

    def row(fmt: str, quant: str) -> dict:
        return next(r for r in rows if r["format"] == fmt and r["quant"] == quant)

    def at_size_of(fmt: str, quant: str) -> dict:
        anchor = row(fmt, quant)
        planned = row(fmt, f"auto-{round(anchor['size_bytes'] / 1e6, 3):g}MB")
        return {"anchor": quant, "anchor_bytes": anchor["size_bytes"], "anchor_mean_kld": anchor["mean_kld"],
                "planned_bytes": planned["size_bytes"], "planned_mean_kld": planned["mean_kld"],
                "planned_predicted_kld": planned["predicted_mean_kld"],
                "ratio": round(planned["mean_kld"] / anchor["mean_kld"], 3)}

    quality_plans = []
    for r in rows:
        if r["kind"] != "planned" or "max_mean_kld" not in (r.get("goal") or {}):
            continue
        goal = r["goal"]["max_mean_kld"]
        meeting = [f for f in rows if f["kind"] == "fixed" and f["format"] == r["format"] and f["mean_kld"] <= goal]
        smallest = min(meeting, key=lambda f: f["size_bytes"]) if meeting else None
        quality_plans.append({
            "format": r["format"], "max_mean_kld": goal, "bytes": r["size_bytes"], "mean_kld": r["mean_kld"],
            "predicted": r["predicted_mean_kld"], "tries": r["tries"], "met": r["mean_kld"] <= goal,
            "smallest_fixed_meeting": smallest and smallest["quant"],
            "smallest_fixed_bytes": smallest and smallest["size_bytes"],
            "no_larger": smallest is None or r["size_bytes"] <= smallest["size_bytes"]})
    return {"model": model, "gguf_at_q4_k_m_size": at_size_of("gguf", "Q4_K_M"),
            "mlx_at_4bit_g64_size": at_size_of("mlx", "4bit-g64"), "quality_plans": quality_plans, "front": rows}


def markdown(results: list[dict]) -> str:
    lines = ["| model | Q4_K_M KLD | planned GGUF at its size | ratio (≤ 0.8) | MLX 4-bit g64 KLD "
             "| planned MLX at its size | ratio (≤ 0.6) | KLD plans met | no larger than fixed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        g, m, q = r["gguf_at_q4_k_m_size"], r["mlx_at_4bit_g64_size"], r["quality_plans"]
        lines.append(f"| {r['model']} | {g['anchor_mean_kld']:.5f} | {g['planned_mean_kld']:.5f} | {g['ratio']:.2f} "
                     f"| {m['anchor_mean_kld']:.5f} | {m['planned_mean_kld']:.5f} | {m['ratio']:.2f} "
                     f"| {sum(p['met'] for p in q)}/{len(q)} | {sum(p['no_larger'] for p in q)}/{len(q)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated models: demo and families of tests/families.py")
    parser.add_argument("--tokens", type=int, default=512)  # 2 windows: MLX runs on a slow CPU backend here
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--reuse", action="store_true", help="take a model's finished sweep from bench/work/plan")
    parser.add_argument("--fixed", default=FAMILY_FIXED,
                        help="the families' fixed recipes (sweep --fixed); the demo's are DEMO_FIXED")
    args = parser.parse_args()
    models = args.only.split(",") if args.only else ["demo", *FAMILIES]
    results = []
    for model in models:
        source = checkpoint_for(model)
        fixed = DEMO_FIXED if model == "demo" else args.fixed
        front = sweep(model, source, args.tokens, args.context, args.reuse, fixed)
        result = figures(model, front)
        result["estimator"] = estimator_fit(source, OUT / model)
        results.append(result)
        print(markdown([result]).splitlines()[-1], flush=True)
    date = datetime.date.today().isoformat()
    suffix = "" if not args.only else "-only-" + "-".join(models)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"plan-{date}{suffix}.json"
    path.write_text(json.dumps({"date": date, "tokens": args.tokens, "context": args.context, "gate": GATE,
                                "models": results}, indent=2) + "\n")
    print(markdown(results))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
