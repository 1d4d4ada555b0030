"""MLX quantization types side by side (issue #28's MLX table): each mode and method siliconvert writes, beside
GGUF Q4_K_M (the yardstick) and mlx_lm.convert's `--q-mode`s, on the same checkpoint, all scored alike.

For each model (the demo, family checkpoints of tests/families.py, the real SmolLM2-135M) one siliconvert recipe
writes MLX affine 4-bit g64 rounded to nearest and by GPTQ (`method: gptq`), bits planned per module at 4.4 bits
per weight and rounded by GPTQ (the best MLX at <= 4.5), the float modes mxfp4, nvfp4 and mxfp8, and GGUF Q4_K_M;
then mlx_lm.convert writes each `--q-mode` (affine 4-bit g64 and the three float modes),
and every artifact is scored by `siliconvert validate` (the same windows, the same float32 transformers
reference). Bits per weight are the artifact's bytes × 8 over the source's parameters, for every row alike, and
again for its weights alone (`weight_bytes`: without the tokenizer files, which are most of the difference on a
small checkpoint).

    .venv/bin/python -m bench.mlx_quants [--models demo,qwen3,gemma2,real] [--tokens 1024] [--context 256]

Writes bench/results/mlx-quants-<YYYY-MM-DD>.json and prints the table as Markdown (rows tagged by format).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from bench.families import ENV, figures, last_line, produced
from bench.run import RESULTS_DIR, WORK_DIR
from siliconvert.checkpoint import Checkpoint

OUT = WORK_DIR / "mlx-quants"
# siliconvert's targets: the rows of the table, GGUF Q4_K_M last (the yardstick)
TARGETS = [{"format": "mlx", "bits": 4, "group_size": 64}, {"format": "mlx", "bits": 4, "group_size": 64,
                                                             "method": "gptq"},
           # the best MLX at <= 4.5 bits per weight (issue #28): bits planned per module under the size, each rounded
           # by GPTQ; 4.4 on the planned weights leaves the unplanned (norms) and the file's header within 4.5
           {"format": "mlx", "bits": "auto", "plan": {"bits_per_weight": 4.4}, "method": "gptq"},
           {"format": "mlx", "mode": "mxfp4"}, {"format": "mlx", "mode": "nvfp4"}, {"format": "mlx", "mode": "mxfp8"},
           {"format": "gguf", "quants": ["Q4_K_M"]}]
# mlx_lm.convert's --q-mode, each at its own default bits and group size
Q_MODES = {"affine": ["--q-bits", "4", "--q-group-size", "64"], "mxfp4": [], "nvfp4": [], "mxfp8": []}
YARDSTICK = "gguf Q4_K_M"
# what a model's MLX targets add: Gemma 2's sliding window is honoured only by siliconvert's own model file
MLX_TARGET_KEYS = {"gemma2": {"model_file": "faithful"}}


def source_of(model: str) -> Path:
    """The checkpoint of a model name: "demo", "real" (SmolLM2-135M) or a family of tests/families.py."""
    if model == "demo":
        from siliconvert.demo import demo_checkpoint

        return demo_checkpoint()
    if model == "real":
        from siliconvert.realweights import real_checkpoint

        return real_checkpoint()
    from siliconvert.demo import small_checkpoint
    from tests.families import FAMILY_CASES

    tokenizer, config = FAMILY_CASES[model]
    return small_checkpoint(None, model, tokenizer, config=config)


def ours(model: str, source: Path, args: argparse.Namespace) -> dict[str, dict]:
    out = OUT / model / "siliconvert"
    recipe = OUT / model / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({
        "name": model, "source": str(source), "output": str(out),
        "targets": [target | MLX_TARGET_KEYS.get(model, {}) if target["format"] == "mlx" else target
                    for target in TARGETS],
        "validate": {"corpus": "builtin", "tokens": args.tokens, "context": args.context,
                     "gates": {"max_mean_kld": 10.0}},
    }))
    run = subprocess.run([str(Path(sys.executable).with_name("siliconvert")), "recipe", str(recipe)], env=ENV,
                         capture_output=True, text=True)
    report = out / "report.json"
    if not report.is_file() or run.returncode not in (0, 1):
        return {"recipe": {"error": last_line(run)}}
    return {f"{a['format']} {a['quant']}": figures(a) | {"weight_bytes": weight_bytes(Path(a["path"]))}
            for a in json.loads(report.read_text())["artifacts"]}


def anchors(model: str, source: Path, args: argparse.Namespace) -> dict[str, dict]:
    out = OUT / model / "anchors"
    out.mkdir(parents=True, exist_ok=True)
    scored = {}
    for mode, flags in Q_MODES.items():
        name = f"mlx_lm.convert --q-mode {mode}"
        path = out / f"mlx-lm-{mode}"
        artifact = produced(path, [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source),
                                   "--mlx-path", str(path), "-q", "--q-mode", mode, *flags])
        if isinstance(artifact, str):
            scored[name] = {"error": artifact}
            continue
        report_dir = out / f"validate-{mode}"
        run = subprocess.run([str(Path(sys.executable).with_name("siliconvert")), "validate", str(artifact),
                              "--source", str(source), "--output", str(report_dir), "--tokens", str(args.tokens),
                              "--context", str(args.context)], env=ENV, capture_output=True, text=True)
        report = report_dir / "report.json"
        scored[name] = ({**figures(json.loads(report.read_text())["artifacts"][0]),
                         "weight_bytes": weight_bytes(artifact)} if report.is_file() else {"error": last_line(run)})
    return scored


def weight_bytes(artifact: Path) -> int:
    """The bytes of an artifact's weights: an MLX folder's safetensors files (their headers, scales, biases and
    every float array included), a GGUF file's tensor data. Beside the artifact's bytes, which count its tokenizer:
    on the family checkpoints (0.7M parameters) that is 0.7 bits per weight of the artifact's."""
    if artifact.is_dir():
        return sum(f.stat().st_size for f in artifact.glob("*.safetensors"))
    from gguf import GGUFReader

    return sum(int(tensor.n_bytes) for tensor in GGUFReader(artifact).tensors)


def with_bits(rows: dict[str, dict], parameters: int) -> dict[str, dict]:
    """Each row with its bits per weight (of the artifact, and of its weights alone) and its mean KLD over the
    yardstick's."""
    yardstick = rows.get(YARDSTICK, {}).get("mean_kld")
    for cell in rows.values():
        if "error" not in cell:
            cell["bits_per_weight"] = cell["size_bytes"] * 8 / parameters
            cell["weights_bits_per_weight"] = cell["weight_bytes"] * 8 / parameters
            cell["kld_over_q4_k_m"] = cell["mean_kld"] / yardstick if yardstick else None
    return rows


def markdown(models: dict[str, dict]) -> str:
    lines = ["| model | type | bytes | bits/weight | weights' bits/weight | mean KLD | × Q4_K_M | same top-1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, row in models.items():
        for name, cell in row["rows"].items():
            if "error" in cell:
                lines.append(f"| {model} | {name} | – | – | – | – | – | {cell['error']} |")
                continue
            ratio = f"{cell['kld_over_q4_k_m']:.2f}" if cell.get("kld_over_q4_k_m") else "–"
            weights = f"{cell['weights_bits_per_weight']:.2f}" if "weights_bits_per_weight" in cell else "–"
            lines.append(f"| {model} | {name} | {cell['size_bytes']:,} | {cell['bits_per_weight']:.2f} | {weights} | "
                         f"{cell['mean_kld']:.5f} | {ratio} | {cell['same_top1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,qwen3,gemma2,real")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--no-anchors", action="store_true", help="siliconvert's rows only")
    args = parser.parse_args()
    models: dict[str, dict] = {}
    for model in args.models.split(","):
        source = source_of(model)
        print(f"== {model}: {source}", file=sys.stderr, flush=True)
        parameters = int(sum(np.prod(info.shape) for info in Checkpoint.open(source).tensor_infos.values()))
        rows = ours(model, source, args) | ({} if args.no_anchors else anchors(model, source, args))
        models[model] = {"source": str(source), "parameters": parameters, "rows": with_bits(rows, parameters)}
    result = {"date": datetime.date.today().isoformat(), "tokens": args.tokens, "context": args.context,
              "models": models}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"mlx-quants-{result['date']}.json"
    if path.is_file():  # a run of some models adds to (or redoes) the day's rows
        earlier = json.loads(path.read_text())
        if (earlier["tokens"], earlier["context"]) == (args.tokens, args.context):
            result["models"] = earlier["models"] | models
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["models"]))
    print(f"written: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
