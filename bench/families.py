"""Every family, every format, beside the anchors: the table issue #14 asks for.

For each family in tests/families.py (small trained checkpoints with the family's traits switched on) this
runs one siliconvert recipe (MLX 4-bit g64, GGUF F16 + Q4_K_M, Core ML FP16), then the anchors on the same
checkpoint (mlx_lm.convert unquantized and 4-bit g64; llama.cpp's convert_hf_to_gguf to F16 and its
quantizer to Q4_K_M), and scores every artifact with the same validation (`siliconvert validate`: the same
windows, the same float32 transformers reference). An anchor that refuses a checkpoint or fails to load is
recorded as such, with its last error line.

    .venv/bin/python -m bench.families [--only qwen3,gemma2] [--tokens 512] [--context 128]

Writes bench/results/families-<YYYY-MM-DD>.json and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from bench.run import QUANTIZE_SCRIPT, RESULTS_DIR, WORK_DIR, AnchorUnavailable, llama_cpp_converter
from siliconvert.demo import small_checkpoint
from tests.families import FAMILY_CASES, GEMMA4_EXPERTS, gemma4_experts

OUT = WORK_DIR / "families"
# Cases beside FAMILY_CASES' one per family (--only names them): a trait the family's case leaves off. Gemma 4's
# expert block as 26B-A4B has it, trained, and with its router's scales set apart from 1 (tests/families.py)
VARIANTS = {
    "gemma4_text.experts": lambda: small_checkpoint(None, "gemma4_text", FAMILY_CASES["gemma4_text"][0],
                                                    config=FAMILY_CASES["gemma4_text"][1] | GEMMA4_EXPERTS),
    "gemma4_text.experts-scaled": lambda: gemma4_experts(OUT / "sources" / "gemma4_text.experts-scaled"),
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SILICONVERT_QUIET": "1"}


class Notes:
    """What bench.run's converter helper reports to (its `say` and `tool_notes`)."""

    def __init__(self) -> None:
        self.tool_notes: dict[str, str] = {}

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated families (transformers model types) or {', '.join(VARIANTS)}")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    families = args.only.split(",") if args.only else list(FAMILY_CASES)
    notes = Notes()
    rows: dict[str, dict] = {}
    with llama_cpp_converter(notes) as converter:
        for family in families:
            if family in VARIANTS:
                source = VARIANTS[family]()
            else:
                tokenizer, config = FAMILY_CASES[family]
                source = small_checkpoint(None, family, tokenizer, config=config)
            notes.say(f"== {family}: {source}")
            rows[family] = {"siliconvert": ours(family, source, args), "anchors": anchors(family, source, converter,
                                                                                          args)}
    result = {"date": datetime.date.today().isoformat(), "tokens": args.tokens, "context": args.context,
              "tools": notes.tool_notes, "families": rows}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"families-{result['date']}.json"
    if path.is_file():  # a run of some families adds to (or redoes) the day's rows
        earlier = json.loads(path.read_text())
        if (earlier["tokens"], earlier["context"]) == (args.tokens, args.context):
            result["families"] = earlier["families"] | rows
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["families"]))
    notes.say(f"written: {path}")


# How a writer's refusal names its format, and the target it refuses
REFUSALS = {"MLX (": "mlx", "GGUF (": "gguf", "Core ML": "coreml"}


def ours(family: str, source: Path, args: argparse.Namespace, gguf_quants: tuple[str, ...] = ("F16", "Q4_K_M"),
         out_root: Path = OUT) -> dict:
    """One recipe, three formats; each artifact's figures from its report. A format whose writer refuses the
    checkpoint (naming the trait) is recorded with its refusal, and the recipe runs again without it."""
    out = out_root / family / "siliconvert"
    recipe = out_root / family / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    targets = {"mlx": {"format": "mlx", "bits": 4, "group_size": 64},
               "gguf": {"format": "gguf", "quants": list(gguf_quants)},
               "coreml": {"format": "coreml", "precision": "fp16", "context": 2 * args.context}}
    refused: dict[str, dict] = {}
    while targets:
        recipe.write_text(yaml.safe_dump({
            "name": family, "source": str(source), "output": str(out), "targets": list(targets.values()),
            "validate": {"corpus": "builtin", "tokens": args.tokens, "context": args.context},
        }))
        run = subprocess.run([str(Path(sys.executable).with_name("siliconvert")), "recipe", str(recipe)], env=ENV,
                             capture_output=True, text=True)
        report = out / "report.json"
        if report.is_file() and run.returncode in (0, 1):
            artifacts = json.loads(report.read_text())["artifacts"]
            return refused | {f"{a['format']} {a['quant']}": figures(a) for a in artifacts}
        error = last_line(run)
        format_refused = next((name for marker, name in REFUSALS.items() if marker in error), None)
        if format_refused not in targets:
            return refused | {"recipe": {"error": error}}
        refused[f"{format_refused} (refused)"] = {"error": error}
        del targets[format_refused]
    return refused


def anchors(family: str, source: Path, converter: Path, args: argparse.Namespace,
            quants: tuple[str, ...] = ("Q4_K_M",), out_root: Path = OUT) -> dict:
    out = out_root / family / "anchors"
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path | str] = {}
    for name, flags in (("mlx_lm.convert 16-bit", ["--dtype", "float16"]), ("mlx_lm.convert 4-bit g64",
                                                                              ["-q", "--q-bits", "4",
                                                                               "--q-group-size", "64"])):
        path = out / name.replace(" ", "-")
        made[name] = produced(path, [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source),
                                     "--mlx-path", str(path), *flags])
    f16 = out / "llama-cpp-F16.gguf"
    made["convert_hf_to_gguf F16"] = produced(f16, [sys.executable, str(converter / "convert_hf_to_gguf.py"),
                                                    str(source), "--outtype", "f16", "--outfile", str(f16)],
                                              {"PYTHONPATH": str(converter / "gguf-py")})  # its own gguf-py
    for quant in quants:
        quantized = out / f"llama-cpp-{quant}.gguf"
        made[f"llama_model_quantize {quant}"] = (
            produced(quantized, [sys.executable, "-c", QUANTIZE_SCRIPT, str(f16), str(quantized), str(os.cpu_count()),
                                 quant])
            if isinstance(made["convert_hf_to_gguf F16"], Path) else "no F16 file to quantize")
    scored = {}
    for name, artifact in made.items():
        if isinstance(artifact, str):
            scored[name] = {"error": artifact}
            continue
        report_dir = out / f"validate-{artifact.name}"
        run = subprocess.run([str(Path(sys.executable).with_name("siliconvert")), "validate", str(artifact),
                              "--source", str(source), "--output", str(report_dir), "--tokens", str(args.tokens),
                              "--context", str(args.context)], env=ENV, capture_output=True, text=True)
        report = report_dir / "report.json"
        scored[name] = (figures(json.loads(report.read_text())["artifacts"][0]) if report.is_file()
                        else {"error": last_line(run)})
    return scored


def produced(path: Path, command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Path | str:
    """`path` once `command` made it (anew), or the command's last error line."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    run = subprocess.run(command, env={**ENV, **(env or {})}, capture_output=True, text=True, cwd=cwd)
    return path if run.returncode == 0 and path.exists() else last_line(run)


def figures(artifact: dict) -> dict:
    metrics = artifact["metrics"]
    return {"mean_kld": metrics["mean_kld"], "same_top1": metrics["same_top1"], "size_bytes": artifact["size_bytes"],
            "passed": artifact["gates"]["passed"], "tokenizer_match": artifact["tokenizer_match"],
            "kv_cache": (artifact.get("kv_cache") or {}).get("consistent"), "runtime": artifact["runtime"],
            "router_agreement": (artifact.get("router_agreement") or {}).get("same_experts")}


def last_line(run: subprocess.CompletedProcess) -> str:
    """The error line of a failed command: the last that names an error, else the last line."""
    lines = [line for line in (run.stderr + run.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [f"exit {run.returncode}"])[-1][:300]


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| family | artifact | mean KLD | same top-1 | size | gates |", "|---|---|---:|---:|---:|---|"]
    for family, row in rows.items():
        for side in ("siliconvert", "anchors"):
            for name, cell in row[side].items():
                label = name if side == "siliconvert" else f"anchor: {name}"
                if "error" in cell:
                    lines.append(f"| {family} | {label} | – | – | – | {cell['error']} |")
                    continue
                passed = "" if side == "anchors" else ("pass" if cell["passed"] else "FAIL")
                lines.append(f"| {family} | {label} | {cell['mean_kld']:.5f} | {cell['same_top1']:.3f} | "
                             f"{cell['size_bytes'] / 1e6:.1f} MB | {passed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except AnchorUnavailable as e:
        sys.exit(f"bench.families: {e}")
