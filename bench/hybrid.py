"""Hybrid models in GGUF beside llama.cpp's own converter (issue #26's table, its GGUF column).

For each hybrid family in tests/families.py (a layer mixer other than attention: LFM2's gated short convolutions,
the gated delta rule of Qwen3.5, Qwen3.5-MoE and Qwen3-Next in the shapes llama.cpp's graphs run)
this runs one siliconvert recipe (GGUF F16 + Q4_K_M), then llama.cpp's convert_hf_to_gguf (F16) and its quantizer
(Q4_K_M) on the same checkpoint, scores every file with `siliconvert validate` (same windows, same float32
transformers reference), and measures in llama.cpp what each file keeps per sequence: the recurrent state (a
sequence's state saved alone, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) and the KV cache after `--context` tokens.

llama.cpp's converter tells Granite 4.0-H's attention layers by a layer_types entry "attention"; transformers ≥ 5.25
writes "full_attention" (and "linear_attention" for Mamba2), so on the checkpoint as saved it marks every layer
recurrent (head_count_kv all 0) and llama.cpp cannot load the file (blk.1.ssm_in.weight is missing). Here the anchor
converts a copy whose config.json spells layer_types the older way (transformers reads both); its rows say so.

llama.cpp's converter recognises BPE pre-tokenizers by a hash of known tokenizers' output and refuses the test
checkpoints' one (and LFM2's own, issue #26). Here only, its `get_vocab_base_pre` is patched to answer the
pre-tokenizer siliconvert derived from tokenizer.json (what our F16 file says), so the anchor's vocabulary is the
same and the table compares the weights; the patch is named in the results' tool notes.

    .venv/bin/python -m bench.hybrid [--only lfm2] [--tokens 512] [--context 128]

Writes bench/results/hybrid-<YYYY-MM-DD>.json and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import yaml

from bench.families import ENV, Notes, figures, last_line, produced
from bench.run import QUANTIZE_SCRIPT, RESULTS_DIR, WORK_DIR, AnchorUnavailable, llama_cpp_converter
from siliconvert.demo import small_checkpoint
from tests.families import FAMILY_CASES, LLAMA_CPP_SHAPES

OUT = WORK_DIR / "hybrid"
# the cases of tests/families.py with a mixer other than attention (the gated delta ones in llama.cpp's shapes)
HYBRIDS = ("lfm2", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "granitemoehybrid")
# layer_types as transformers ≥ 5.25 writes them → as llama.cpp's converter reads them (families it misreads)
OLDER_LAYER_TYPES = {"granitemoehybrid": {"linear_attention": "mamba", "full_attention": "attention"}}
QUANTS = ("F16", "Q4_K_M")
PARTIAL_ONLY = 1  # llama.h: LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
# llama.cpp's converter asserts on a Qwen3.5 / Qwen3-Next checkpoint without its multi-token-prediction head (mtp.*,
# which transformers never runs and a fine-tune saved by transformers lacks) unless told to leave it out
CONVERTER_FLAGS = {family: ["--no-mtp"] for family in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")}
# llama.cpp's converter with its pre-tokenizer lookup answered by siliconvert's choice (argv: converter folder,
# pre-tokenizer name, then the converter's own arguments)
PATCHED_CONVERTER = """\
import runpy, sys
converter, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [converter, converter + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [converter + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated families (transformers model types)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    families = args.only.split(",") if args.only else list(HYBRIDS)
    notes = Notes()
    notes.tool_notes["llama.cpp converter patch"] = ("get_vocab_base_pre answers the pre-tokenizer siliconvert "
                                                     "derived (its hash table refuses these tokenizers)")
    rows: dict[str, dict] = {}
    with llama_cpp_converter(notes) as converter:
        for family in families:
            tokenizer, config = FAMILY_CASES[family]
            source = small_checkpoint(None, family, tokenizer, config=config | LLAMA_CPP_SHAPES.get(family, {}))
            notes.say(f"== {family}: {source}")
            mine = ours(family, source, args)
            rows[family] = {"siliconvert": mine, "anchors": anchors(family, source, converter, args, mine)}
    result = {"date": datetime.date.today().isoformat(), "tokens": args.tokens, "context": args.context,
              "tools": notes.tool_notes, "families": rows}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"hybrid-{result['date']}.json"
    if path.is_file():  # the same day's other families stay (--only measures some)
        result["families"] = json.loads(path.read_text())["families"] | result["families"]
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["families"]))
    notes.say(f"written: {path}")


def ours(family: str, source: Path, args: argparse.Namespace) -> dict:
    out = OUT / family / "siliconvert"
    recipe = OUT / family / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({
        "name": family, "source": str(source), "output": str(out),
        "targets": [{"format": "gguf", "quants": list(QUANTS)}],
        "validate": {"corpus": "builtin", "tokens": args.tokens, "context": args.context, "latency": False}}))
    run = subprocess.run([str(Path(sys.executable).with_name("siliconvert")), "recipe", str(recipe)], env=ENV,
                         capture_output=True, text=True)
    report = out / "report.json"
    if not (report.is_file() and run.returncode in (0, 1)):
        return {"recipe": {"error": last_line(run)}}
    return {f"gguf {a['quant']}": figures(a) | state_bytes(Path(a["path"]), args.context)
            for a in json.loads(report.read_text())["artifacts"]}


def anchors(family: str, source: Path, converter: Path, args: argparse.Namespace, mine: dict) -> dict:
    out = OUT / family / "anchors"
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "llama-cpp-F16.gguf"
    ours_f16 = mine.get("gguf F16", {}).get("path")
    if ours_f16 is None:
        return {"convert_hf_to_gguf F16": {"error": "no siliconvert F16 file to read the pre-tokenizer from"}}
    pre = gguf.GGUFReader(ours_f16).fields["tokenizer.ggml.pre"].contents()
    converted = older_layer_types(source, out / "source", OLDER_LAYER_TYPES[family]) if (
        family in OLDER_LAYER_TYPES) else source
    made: dict[str, Path | str] = {"convert_hf_to_gguf F16": produced(f16, [
        sys.executable, "-c", PATCHED_CONVERTER, str(converter), pre, str(converted), "--outtype", "f16",
        "--outfile", str(f16), *CONVERTER_FLAGS.get(family, [])])}
    quantized = out / "llama-cpp-Q4_K_M.gguf"
    made["llama_model_quantize Q4_K_M"] = (
        produced(quantized, [sys.executable, "-c", QUANTIZE_SCRIPT, str(f16), str(quantized), str(os.cpu_count()),
                             "Q4_K_M"])
        if isinstance(made["convert_hf_to_gguf F16"], Path) else "no F16 file to quantize")
    if converted != source:
        made = {f"{name} (layer_types respelled)": artifact for name, artifact in made.items()}
    scored = {}
    for name, artifact in made.items():
        if isinstance(artifact, str):
            scored[name] = {"error": artifact}
            continue
        report_dir = out / f"validate-{artifact.name}"
        run = subprocess.run([str(Path(sys.executable).with_name("siliconvert")), "validate", str(artifact),
                              "--source", str(source), "--output", str(report_dir), "--tokens", str(args.tokens),
                              "--context", str(args.context), "--no-latency"], env=ENV, capture_output=True,
                             text=True)
        report = report_dir / "report.json"
        scored[name] = (figures(json.loads(report.read_text())["artifacts"][0]) | state_bytes(artifact, args.context)
                        if report.is_file() else {"error": last_line(run)})
    return scored


def older_layer_types(source: Path, out: Path, spelling: dict[str, str]) -> Path:
    """A copy of the checkpoint (its files linked) whose config.json names the layer types as `spelling` says."""
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.name != "config.json" and not (out / file.name).exists():
            (out / file.name).symlink_to(file)
    config = json.loads((source / "config.json").read_text())
    config["layer_types"] = [spelling.get(kind, kind) for kind in config["layer_types"]]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def state_bytes(path: Path, context: int) -> dict:
    """What llama.cpp keeps for one sequence of `context` tokens of this file: its recurrent state (saved alone)
    and its KV cache (the rest of the sequence's saved state), in bytes as llama.cpp serialises them."""
    from siliconvert.validate.runners.gguf import LlamaCppRunner

    runner = LlamaCppRunner(path, {"context": context})
    try:
        runner.start(np.arange(context) % 100 + 10)
        api, ctx = runner.api, runner.ctx
        recurrent = api.llama_state_seq_get_size_ext(ctx, 0, PARTIAL_ONLY)
        whole = api.llama_state_seq_get_size_ext(ctx, 0, 0)
    finally:
        runner.close()
    header = 2 * ctypes.sizeof(ctypes.c_uint32)  # the magic and seq id each saved state begins with
    return {"path": str(path), "recurrent_state_bytes": recurrent - header, "kv_cache_bytes": whole - recurrent}


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| family | artifact | mean KLD | same top-1 | size | recurrent state | KV cache | gates |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for family, row in rows.items():
        for side in ("siliconvert", "anchors"):
            for name, cell in row[side].items():
                label = name if side == "siliconvert" else f"anchor: {name}"
                if "error" in cell:
                    lines.append(f"| {family} | {label} | – | – | – | – | – | {cell['error']} |")
                    continue
                passed = "pass" if cell["passed"] else "FAIL"
                lines.append(f"| {family} | {label} | {cell['mean_kld']:.2e} | {cell['same_top1']:.3f} | "
                             f"{cell['size_bytes'] / 1e6:.2f} MB | {cell['recurrent_state_bytes']} B | "
                             f"{cell['kv_cache_bytes']} B | {passed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except AnchorUnavailable as e:
        sys.exit(f"bench.hybrid: {e}")
