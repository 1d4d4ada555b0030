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

MLX: siliconvert writes the sweep's fixed types (formats/mlx.py: affine 3/4/6/8-bit g64 and 2-bit, mlx-lm's mixed
recipes, GPTQ at 3 and 4 bits, mxfp4, nvfp4, mxfp8) in one streamed pass; beside them mlx_lm.convert at each --q-mode
(affine at 4-bit g64) and mlx-lm's learned methods run as its own commands (mlx_lm.quant.gptq, awq, dynamic_quant,
dwq: MLX_LEARNED) on siliconvert's builtin calibration text (they fetch their own from the network otherwise); one
that fails records its last error line. Core ML: fp16, int8, int4 and every palette in one pass; no anchor tool.
Bits per weight of MLX and Core ML rows: the stored tensors' bytes × 8 over the checkpoint's parameters.

Checkpoints: the demo model, and two family checkpoints: a Llama of hidden size 256 (tests/test_gguf.py's, rows the
256-blocks of K- and i-quants fill) and tests/families.py's Mixtral (4 experts, where MXFP4_MOE puts experts in
MXFP4; hidden 128, so the 256-block types fall back as llama.cpp's rules say). SentencePiece both: llama.cpp's
converter takes them as they are.

    .venv/bin/python -m bench.quants [--only demo,llama] [--formats gguf,mlx,coreml] [--tokens 512] [--context 128]

Writes bench/results/quants-<YYYY-MM-DD>.json (a run of some checkpoints or formats redoes those rows of the day's)
and prints a table per format as Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import gguf

import siliconvert.formats  # noqa: F401  (registers the format entries detect_artifact asks)
from bench.families import Notes, produced
from bench.run import RESULTS_DIR, WORK_DIR, AnchorUnavailable, llama_cpp_converter
from siliconvert.artifacts import Artifact
from siliconvert.calibration import Calibrations
from siliconvert.checkpoint import Checkpoint
from siliconvert.commands.pipeline import validate_artifacts
from siliconvert.convert.gguf import GGUFWriter
from siliconvert.demo import demo_checkpoint, small_checkpoint
from siliconvert.errors import SiliconvertError
from siliconvert.format import detect_artifact
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


# mlx-lm's learned methods, run as its own commands (module → arguments after --model/--mlx-path), each at its
# 4-bit g64 where it has one, on siliconvert's builtin calibration text (mlx_calibration_home); their other options
# as shipped
MLX_LEARNED = {
    "mlx_lm.quant.gptq": ["--bits", "4", "--group-size", "64", "--num-samples", "16", "--sequence-length", "512"],
    "mlx_lm.quant.awq": ["--bits", "4", "--group-size", "64", "--num-samples", "16", "--sequence-length", "512"],
    "mlx_lm.quant.dynamic_quant": [],  # 4 or 5 bits per module at g64 by measured sensitivity, 5.0 bits per weight
    "mlx_lm.quant.dwq": ["--bits", "4", "--group-size", "64", "--num-samples", "16", "--max-seq-length", "512",
                         "--data-path", "{data}"],  # distilled against the float model: a dataset, gradient steps
}

# their rows (gptq's beside siliconvert's GPTQ; gptq keeps the layers it does not round at 6 bits, as shipped)
MLX_LEARNED_TYPES = {"mlx_lm.quant.gptq": "4bit-g64-gptq", "mlx_lm.quant.awq": "4bit-g64-awq",
                     "mlx_lm.quant.dynamic_quant": "dynamic-4-5bit-g64", "mlx_lm.quant.dwq": "4bit-g64-dwq"}


def mlx_rows(name: str, source: Path, args: argparse.Namespace, converter: Path) -> list[tuple[dict, Artifact]]:
    """siliconvert's MLX types (the sweep's fixed ones: formats/mlx.py, and 2-bit) streamed in one pass, beside
    mlx_lm.convert's --q-modes and mlx-lm's learned methods on the same checkpoint."""
    from bench.mlx_quants import Q_MODES
    from siliconvert.convert.mlx import MLXWriter
    from siliconvert.format import entry
    from siliconvert.recipe import MLXTarget

    out, checkpoint = OUT / name / "mlx", Checkpoint.open(source)
    mlx = entry("mlx")
    targets = [MLXTarget(format="mlx", bits=2, group_size=64), *mlx.sweep_fixed([], mlx.fixed_quants)]
    calibration = Calibrations(checkpoint, OUT / name / ".cache")
    made = streamed(checkpoint, [MLXWriter(checkpoint, t, out / "siliconvert", name, calibration=calibration)
                                 for t in targets])
    rows = [(row("mlx", name, a.quant, "siliconvert", a.path, checkpoint), a) for a in made]
    for mode, flags in Q_MODES.items():
        path = out / "mlx-lm" / f"q-mode-{mode}"
        done = produced(path, [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path",
                               str(path), "-q", "--q-mode", mode, *flags])
        kind = "4bit-g64" if mode == "affine" else mode  # the row of siliconvert's same type
        rows.append(made_row("mlx", name, kind, "mlx_lm.convert", done, checkpoint))
    home = mlx_calibration_home(out / "mlx-lm")
    for module, flags in MLX_LEARNED.items():
        path = out / "mlx-lm" / module.rsplit(".", 1)[1]
        # as its console script (mlx_lm.awq …) runs it: awq.py and dwq.py have no __main__ block for `python -m`
        command = [sys.executable, "-c", f"import sys; from {module} import main; sys.argv[0] = {module!r}; main()",
                   "--model", str(source), "--mlx-path", str(path),
                   *(flag.format(data=home / "data") for flag in flags)]
        done = produced(path, command, {"HOME": str(home)}, cwd=home)
        rows.append(made_row("mlx", name, MLX_LEARNED_TYPES[module], "mlx-lm learned", done, checkpoint))
    return rows


def coreml_rows(name: str, source: Path, args: argparse.Namespace, converter: Path) -> list[tuple[dict, Artifact]]:
    """siliconvert's Core ML precisions (fp16, int8, int4, the palettes: formats/coreml.py's) in one pass. No anchor
    tool: coremltools compresses a package it converted itself, which does not build these families' graphs."""
    from siliconvert.convert.coreml import CoreMLWriter
    from siliconvert.format import entry
    from siliconvert.recipe import CoreMLTarget

    out, checkpoint = OUT / name / "coreml", Checkpoint.open(source)
    target = CoreMLTarget(format="coreml", context=args.context, precision=list(entry("coreml").fixed_quants))
    try:
        made = streamed(checkpoint, [CoreMLWriter(checkpoint, target, out / "siliconvert", name,
                                                  calibration=Calibrations(checkpoint, OUT / name / ".cache"))])
    except SiliconvertError as e:  # a trait Core ML's graph does not build: the writer names it
        return [({"checkpoint": name, "format": "coreml", "type": "*", "tool": "siliconvert", "error": str(e)},
                 None)]
    return [(row("coreml", name, a.quant, "siliconvert", a.path, checkpoint), a) for a in made]


def streamed(checkpoint: Checkpoint, writers: list) -> list[Artifact]:
    """Every writer fed from one read of the checkpoint; their artifacts."""
    for info, array in checkpoint.tensors():
        for writer in writers:
            writer.add(info, array)
    return [artifact for writer in writers for artifact in writer.finish()]


def mlx_calibration_home(folder: Path) -> Path:
    """A home folder for mlx-lm's learned methods: their calibration file (~/.cache/mlx-lm/calibration_v5.txt, which
    they otherwise fetch) holding siliconvert's builtin calibration text, and the same text as a dataset of
    {"text"} lines (data/train.jsonl) for DWQ."""
    from siliconvert.calibration import BUILTIN, calibration_text

    home = folder / "home"
    text = calibration_text(BUILTIN)[1]
    (home / ".cache" / "mlx-lm").mkdir(parents=True, exist_ok=True)
    (home / ".cache" / "mlx-lm" / "calibration_v5.txt").write_text(text)
    (home / "data").mkdir(exist_ok=True)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    (home / "data" / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return home


def row(fmt: str, name: str, kind: str, tool: str, path: Path, checkpoint: Checkpoint) -> dict:
    """A row's identity and its sizes: bytes on disk, and bits per weight as the stored tensors' bytes × 8 over the
    checkpoint's parameters (GGUF: over the file's own tensors' values, which are the same weights)."""
    if fmt == "gguf":
        return {"checkpoint": name, "format": fmt, "type": kind, "tool": tool, **gguf_size(path)}
    files = (list(path.glob("*.safetensors")) if fmt == "mlx"
             else list(path.glob("*.mlpackage/Data/com.apple.CoreML/weights/weight.bin")))
    stored = sum(safetensors_data_bytes(f) if fmt == "mlx" else f.stat().st_size for f in files)
    parameters = sum(math.prod(info.shape) for info in checkpoint.tensor_infos.values())
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"checkpoint": name, "format": fmt, "type": kind, "tool": tool, "bytes": on_disk,
            "bits_per_weight": 8 * stored / parameters}


def made_row(fmt: str, name: str, kind: str, tool: str, done: Path | str,
             checkpoint: Checkpoint) -> tuple[dict, Artifact | None]:
    """A row for an anchor's output: scored if it was made, else its error line."""
    if isinstance(done, str):
        return {"checkpoint": name, "format": fmt, "type": kind, "tool": tool, "error": done}, None
    return row(fmt, name, kind, tool, done, checkpoint), dataclasses.replace(detect_artifact(done), quant=kind)


def safetensors_data_bytes(path: Path) -> int:
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


# format → its rows' maker
ROW_MAKERS = {"gguf": gguf_rows, "mlx": mlx_rows, "coreml": coreml_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated checkpoints (" + ", ".join(CHECKPOINTS) + ")")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--formats", default=",".join(ROW_MAKERS),
                        help="comma-separated formats whose rows to make (" + ", ".join(ROW_MAKERS) + ")")
    args = parser.parse_args()
    makers = [ROW_MAKERS[fmt] for fmt in args.formats.split(",")]
    notes = Notes()
    settings = Validate(tokens=args.tokens, context=args.context, gates=Gates(), latency=False)
    rows: list[dict] = []
    with llama_cpp_converter(notes) as converter:
        for name in args.only.split(",") if args.only else CHECKPOINTS:
            source = CHECKPOINTS[name]()
            notes.say(f"== {name}: {source}")
            made = [row for maker in makers for row in maker(name, source, args, converter)]
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
        done = {(row["checkpoint"], row["format"]) for row in rows}
        if (earlier["tokens"], earlier["context"]) == (args.tokens, args.context):
            result["tools"] = earlier.get("tools", {}) | result["tools"]
            result["rows"] = [row for row in earlier["rows"] if (row["checkpoint"], row["format"]) not in done] + rows
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["rows"]))
    notes.say(f"written: {path}")


def markdown(rows: list[dict]) -> str:
    """A table per format: one line per (checkpoint, type), the figures of each tool that made it side by side."""
    lines: list[str] = []
    for fmt in dict.fromkeys(row["format"] for row in rows):
        mine = [row for row in rows if row["format"] == fmt]
        tools = list(dict.fromkeys(row["tool"] for row in mine))
        lines += [f"### {fmt}", "", "| checkpoint | type | " + " | ".join(
            f"{tool} bytes | bits/w | mean KLD | same top-1" for tool in tools) + " |",
                  "|---|---|" + "---:|---:|---:|---:|" * len(tools)]
        keyed = {(row["checkpoint"], row["type"], row["tool"]): row for row in mine}
        for checkpoint, kind in dict.fromkeys((row["checkpoint"], row["type"]) for row in mine):
            cells = []
            for tool in tools:
                row = keyed.get((checkpoint, kind, tool))
                if row is None or "error" in row:
                    cells.append(f"– | – | – | {row['error'] if row else '–'}")
                else:
                    cells.append(f"{row['bytes']:,} | {row['bits_per_weight']:.2f} | {row['mean_kld']:.5f} | "
                                 f"{row['same_top1']:.3f}")
            lines.append(f"| {checkpoint} | {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except AnchorUnavailable as e:
        sys.exit(f"bench.quants: {e}")
