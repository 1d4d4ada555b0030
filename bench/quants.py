"""Every quantization type a format writes, beside its anchor tool's own, on the same checkpoints (issue #28's table).

One row per (checkpoint, format, type, tool): the artifact's bytes, bits per weight (its tensors' bytes × 8 over
their values), and, scored by the same validation (same windows, the same float32 transformers reference), mean
KLD and same-top-1. Formats add rows through ROW_MAKERS: a function (checkpoint, its folder, args) → [(row, artifact)]
whose artifacts are scored together with every other's.

GGUF: siliconvert writes every type of recipe.py's GGUF_QUANTS but F16/BF16 in one streamed pass, with the builtin
importance matrix (the i-quants llama.cpp refuses without one need it, and llama-quantize is run with an --imatrix for
all of them in practice); the anchor is llama.cpp's own path: its converter (convert_hf_to_gguf, F16) then
llama_model_quantize on that file, with the same importance matrix. The two should hold the same bytes per tensor
(tests/test_gguf.py holds the streamed path to llama_model_quantize), so their rows agree; a difference would be
the converters'.

Checkpoints: the demo model, and two family checkpoints: a Llama of hidden size 256 (tests/test_gguf.py's, rows the
256-blocks of K- and i-quants fill) and tests/families.py's Mixtral (4 experts, where MXFP4_MOE puts experts in
MXFP4; hidden 128, so the 256-block types fall back as llama.cpp's rules say). SentencePiece both: llama.cpp's
converter takes them as they are.

    .venv/bin/python -m bench.quants [--only demo,llama] [--tokens 512] [--context 128]

Writes bench/results/quants-<YYYY-MM-DD>.json and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path

import gguf

from bench.families import Notes, produced
from bench.run import RESULTS_DIR, WORK_DIR, AnchorUnavailable, llama_cpp_converter
from siliconvert.artifacts import Artifact
from siliconvert.calibration import Calibrations
from siliconvert.checkpoint import Checkpoint
from siliconvert.commands.pipeline import validate_artifacts
from siliconvert.convert.gguf import GGUFWriter
from siliconvert.demo import demo_checkpoint, small_checkpoint
from siliconvert.quantize.gguf import quantize
from siliconvert.recipe import GGUF_QUANTS, Gates, GGUFTarget, Validate
from tests.families import FAMILY_CASES

OUT = WORK_DIR / "quants"
LLAMA_256 = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2, "rope_theta": 25000.0, "train_steps": 60}  # tests/test_gguf.py's TINY
CHECKPOINTS: dict[str, Callable[[], Path]] = {
    "demo": demo_checkpoint,
    "llama": lambda: small_checkpoint(None, "llama", "sentencepiece", **LLAMA_256),
    "mixtral": lambda: small_checkpoint(None, "mixtral", FAMILY_CASES["mixtral"][0], config=FAMILY_CASES["mixtral"][1]),
}
GGUF_TYPES = [quant for quant in GGUF_QUANTS if quant not in ("F16", "BF16")]  # the float files: no quantization


def gguf_rows(name: str, source: Path, args: argparse.Namespace, converter: Path) -> list[tuple[dict, Artifact]]:
    out = OUT / name / "gguf"
    checkpoint = Checkpoint.open(source)
    target = GGUFTarget(format="gguf", quants=GGUF_TYPES, imatrix="builtin")
    writer = GGUFWriter(checkpoint, target, out / "siliconvert", name,
                        calibration=Calibrations(checkpoint, OUT / name / ".cache"))
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    made = [(a.quant, "siliconvert", a.path) for a in writer.finish()]
    f16 = out / "llama-cpp" / f"{name}-F16.gguf"
    f16.parent.mkdir(parents=True, exist_ok=True)
    converted = produced(f16, [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(source), "--outtype",
                               "f16", "--outfile", str(f16)], {"PYTHONPATH": str(converter / "gguf-py")})
    rows: list[tuple[dict, Artifact]] = []
    if isinstance(converted, str):
        rows.append(({"checkpoint": name, "format": "gguf", "type": "*", "tool": "llama-quantize",
                      "error": f"convert_hf_to_gguf: {converted}"}, None))
    else:
        for quant in GGUF_TYPES:
            made.append((quant, "llama-quantize", quantize(f16, f16.with_name(f"{name}-{quant}.gguf"), quant,
                                                           imatrix=writer.imatrix)))
    for quant, tool, path in made:
        rows.append(({"checkpoint": name, "format": "gguf", "type": quant, "tool": tool, **gguf_size(path)},
                     Artifact("gguf", quant, path)))
    return rows


def gguf_size(path: Path) -> dict:
    tensors = gguf.GGUFReader(path).tensors
    data = sum(int(t.n_bytes) for t in tensors)
    return {"bytes": path.stat().st_size, "bits_per_weight": 8 * data / sum(int(t.n_elements) for t in tensors)}


# format → its rows' maker; the MLX and Core ML types join here
ROW_MAKERS = {"gguf": gguf_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated checkpoints (" + ", ".join(CHECKPOINTS) + ")")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    notes = Notes()
    settings = Validate(tokens=args.tokens, context=args.context, gates=Gates(), latency=False)
    rows: list[dict] = []
    with llama_cpp_converter(notes) as converter:
        for name in args.only.split(",") if args.only else CHECKPOINTS:
            source = CHECKPOINTS[name]()
            notes.say(f"== {name}: {source}")
            made = [row for maker in ROW_MAKERS.values() for row in maker(name, source, args, converter)]
            artifacts = [artifact for _, artifact in made if artifact is not None]
            report = validate_artifacts(Checkpoint.open(source), str(source), artifacts, settings,
                                        dict.fromkeys((a.path for a in artifacts), Gates()), OUT / name / "validate")
            scored = {entry["path"]: entry for entry in report["artifacts"]}
            for row, artifact in made:
                if artifact is not None:
                    metrics = scored[str(artifact.path)]["metrics"]
                    row |= {"mean_kld": metrics["mean_kld"], "same_top1": metrics["same_top1"]}
                rows.append(row)
    result = {"date": datetime.date.today().isoformat(), "tokens": args.tokens, "context": args.context,
              "tools": notes.tool_notes, "rows": rows}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"quants-{result['date']}.json"
    if path.is_file():  # a run of some checkpoints adds to (or redoes) the day's rows
        earlier = json.loads(path.read_text())
        done = {row["checkpoint"] for row in rows}
        if (earlier["tokens"], earlier["context"]) == (args.tokens, args.context):
            result["rows"] = [row for row in earlier["rows"] if row["checkpoint"] not in done] + rows
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["rows"]))
    notes.say(f"written: {path}")


def markdown(rows: list[dict]) -> str:
    """One line per (checkpoint, format, type), each tool's figures side by side."""
    tools = list(dict.fromkeys(row["tool"] for row in rows))
    head = "| checkpoint | format | type | " + " | ".join(
        f"{tool} bytes | bits/w | mean KLD | same top-1" for tool in tools) + " |"
    lines = [head, "|---|---|---|" + "---:|---:|---:|---:|" * len(tools)]
    keyed = {(row["checkpoint"], row["format"], row["type"], row["tool"]): row for row in rows}
    for checkpoint, fmt, kind in dict.fromkeys((row["checkpoint"], row["format"], row["type"]) for row in rows):
        cells = []
        for tool in tools:
            row = keyed.get((checkpoint, fmt, kind, tool))
            if row is None or "error" in row:
                cells.append(f"– | – | – | {row['error'] if row else '–'}")
            else:
                cells.append(f"{row['bytes']:,} | {row['bits_per_weight']:.2f} | {row['mean_kld']:.5f} | "
                             f"{row['same_top1']:.3f}")
        lines.append(f"| {checkpoint} | {fmt} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except AnchorUnavailable as e:
        sys.exit(f"bench.quants: {e}")
