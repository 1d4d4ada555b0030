"""Hybrid models in every format beside mlx-lm's and llama.cpp's own converters (issue #26's closing table).

For each hybrid family in tests/families.py (a layer mixer other than attention: LFM2's gated short convolutions,
the gated delta rule of Qwen3.5, Qwen3.5-MoE and Qwen3-Next in the shapes llama.cpp's graphs run, Granite 4.0-H's
Mamba2) this runs one siliconvert recipe (GGUF F16 + Q4_K_M, MLX 4-bit g64, Core ML FP16 at `--context`), then
the anchors on the same checkpoint: llama.cpp's convert_hf_to_gguf (F16) and its quantizer (Q4_K_M), and
mlx_lm.convert 4-bit g64. Every artifact is scored by `siliconvert validate` (same windows, same float32
transformers reference), and each row says what a sequence keeps after `--context` tokens, split into the
recurrent state and the KV cache: for GGUF as llama.cpp measures it (a sequence's state saved alone,
LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY, and the rest), for MLX as mlx-lm's own cache objects hold it, for Core ML as
the manifest's state_bytes say (fp16 states, the KV cache at the package's full context). The Q4_K_M and 4-bit
rows carry their mean KLD over their anchor's (the issue asks for ≤ 1.5×).

mlx_lm.convert refuses some of these checkpoints as transformers 5.25 saves them; where it does, it runs again on a
copy whose config.json carries the smallest patch mlx-lm needs (MLX_CONFIG_PATCHES), named in the row, and both
attempts are recorded.

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
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import yaml

from bench.families import ENV, REFUSALS, Notes, figures, last_line, produced
from bench.run import QUANTIZE_SCRIPT, RESULTS_DIR, WORK_DIR, AnchorUnavailable, llama_cpp_converter
from siliconvert.demo import small_checkpoint
from tests.families import FAMILY_CASES, LLAMA_CPP_SHAPES

OUT = WORK_DIR / "hybrid"
# the cases of tests/families.py with a mixer other than attention (the gated delta ones in llama.cpp's shapes)
HYBRIDS = ("lfm2", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "granitemoehybrid")
# layer_types as transformers ≥ 5.25 writes them → as llama.cpp's converter reads them (families it misreads)
OLDER_LAYER_TYPES = {"granitemoehybrid": {"linear_attention": "mamba", "full_attention": "attention"}}
QUANTS = ("F16", "Q4_K_M")
# the smallest config.json change under which mlx_lm.convert (0.32) takes a checkpoint transformers 5.25 saved, by
# family: what the patch says, and the patch; tried only where it refuses the checkpoint as saved
MLX_CONFIG_PATCHES: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "lfm2": ("block_dim = hidden_size", lambda config: config | {"block_dim": config["hidden_size"]}),
    "qwen3_5_text": ("model_type qwen3_5", lambda config: config | {"model_type": "qwen3_5"}),
    "qwen3_5_moe_text": ("model_type qwen3_5_moe", lambda config: config | {"model_type": "qwen3_5_moe"}),
    "qwen3_next": ("rope_theta and partial_rotary_factor at the top level", lambda config: config | {
        key: config["rope_parameters"][key] for key in ("rope_theta", "partial_rotary_factor")}),
    "granitemoehybrid": ("layer_types mamba / attention, time_step_limit [0, inf]", lambda config: config | {
        "layer_types": [OLDER_LAYER_TYPES["granitemoehybrid"].get(kind, kind) for kind in config["layer_types"]],
        "time_step_limit": [0.0, math.inf]}),
}
# how many MLX 4-bit g64 and GGUF Q4_K_M rows may lose to their anchors' mean KLD (issue #26)
ANCHOR_RATIO_GOAL = 1.5
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
    notes.tool_notes["mlx_lm.convert patch"] = ("where mlx_lm.convert refuses a checkpoint as saved, it runs again on "
                                                "a copy whose config.json has the patch the row names")
    rows: dict[str, dict] = {}
    path = RESULTS_DIR / f"hybrid-{datetime.date.today().isoformat()}.json"
    with llama_cpp_converter(notes) as converter:
        for family in families:
            tokenizer, config = FAMILY_CASES[family]
            source = small_checkpoint(None, family, tokenizer, config=config | LLAMA_CPP_SHAPES.get(family, {}))
            notes.say(f"== {family}: {source}")
            mine = ours(family, source, args)
            rows[family] = {"siliconvert": mine, "anchors": anchors(family, source, converter, args, mine)}
            anchor_ratios(rows[family])
            write(path, args, notes, rows)  # after each family: a long run's finished rows survive its end
    print(markdown(rows))
    notes.say(f"written: {path}")


def write(path: Path, args: argparse.Namespace, notes: Notes, rows: dict[str, dict]) -> None:
    """The result file: these rows, beside the same day's other families measured with the same windows."""
    result = {"date": path.stem.removeprefix("hybrid-"), "tokens": args.tokens, "context": args.context,
              "tools": notes.tool_notes, "families": rows}
    if path.is_file():
        earlier = json.loads(path.read_text())
        if (earlier["tokens"], earlier["context"]) == (args.tokens, args.context):
            result["families"] = earlier["families"] | rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def default_targets(args: argparse.Namespace) -> dict[str, dict]:
    """The recipe's targets by format: GGUF F16 + Q4_K_M, MLX 4-bit g64, Core ML FP16 at `--context`."""
    return {"gguf": {"format": "gguf", "quants": list(QUANTS)},
            "mlx": {"format": "mlx", "bits": 4, "group_size": 64},
            "coreml": {"format": "coreml", "precision": "fp16", "context": args.context}}


def ours(family: str, source: Path, args: argparse.Namespace, targets: dict[str, dict] | None = None) -> dict:
    """One recipe, its `targets` by format (default_targets: three formats); each artifact's figures from its report
    and the state a sequence keeps in it. A format whose writer refuses the checkpoint (naming the trait) is recorded
    with its refusal, and the recipe runs again without it."""
    out = OUT / family / "siliconvert"
    recipe = OUT / family / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    targets = dict(targets or default_targets(args))
    refused: dict[str, dict] = {}
    while targets:
        recipe.write_text(yaml.safe_dump({
            "name": family, "source": str(source), "output": str(out), "targets": list(targets.values()),
            "validate": {"corpus": "builtin", "tokens": args.tokens, "context": args.context, "latency": False}}))
        run = subprocess.run([str(Path(sys.executable).with_name("siliconvert")), "recipe", str(recipe)], env=ENV,
                             capture_output=True, text=True)
        report = out / "report.json"
        if report.is_file() and run.returncode in (0, 1):
            return refused | {f"{a['format']} {a['quant']}": figures(a) | artifact_state_bytes(a, args.context)
                              for a in json.loads(report.read_text())["artifacts"]}
        error = last_line(run)
        format_refused = next((name for marker, name in REFUSALS.items() if marker in error), None)
        if format_refused not in targets:
            return refused | {"recipe": {"error": error}}
        refused[f"{format_refused} (refused)"] = {"error": error}
        del targets[format_refused]
    return refused


def artifact_state_bytes(artifact: dict, context: int) -> dict:
    """The state one sequence keeps in a reported artifact after `context` tokens, as its runtime holds it."""
    path = Path(artifact["path"])
    if artifact["state_bytes"]:  # the writer says (Core ML's manifest)
        states = artifact["state_bytes"]
        return {"path": str(path), "recurrent_state_bytes": sum(size for name, size in states.items()
                                                                if name != "kv_cache"),
                "kv_cache_bytes": states.get("kv_cache", 0)}
    return state_bytes(path, context) if path.is_file() else mlx_state_bytes(path, context)


def anchors(family: str, source: Path, converter: Path, args: argparse.Namespace, mine: dict) -> dict:
    out = OUT / family / "anchors"
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "llama-cpp-F16.gguf"
    ours_f16 = mine.get("gguf F16", {}).get("path")
    if ours_f16 is None:
        return {"convert_hf_to_gguf F16": {"error": "no siliconvert F16 file to read the pre-tokenizer from"}}
    pre = gguf.GGUFReader(ours_f16).fields["tokenizer.ggml.pre"].contents()
    converted = patched_copy(source, out / "source", lambda config: config | {"layer_types": [
        OLDER_LAYER_TYPES[family].get(kind, kind) for kind in config["layer_types"]]}) if (
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
    made |= mlx_lm_anchor(family, source, out)
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
        if not report.is_file():
            scored[name] = {"error": last_line(run)}
            continue
        scored[name] = figures(json.loads(report.read_text())["artifacts"][0]) | (
            state_bytes(artifact, args.context) if artifact.is_file() else mlx_state_bytes(artifact, args.context))
    return scored


def mlx_lm_anchor(family: str, source: Path, out: Path) -> dict[str, Path | str]:
    """mlx_lm.convert 4-bit g64 on the checkpoint as saved; where it refuses, also on a copy with the family's
    MLX_CONFIG_PATCHES entry (named in the row's label)."""
    def convert(checkpoint: Path, folder: Path) -> Path | str:
        return produced(folder, [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(checkpoint),
                                 "--mlx-path", str(folder), "-q", "--q-bits", "4", "--q-group-size", "64"])

    name = "mlx_lm.convert 4-bit g64"
    made = {name: convert(source, out / "mlx-lm-4bit-g64")}
    if isinstance(made[name], str) and family in MLX_CONFIG_PATCHES:
        patch_name, patch = MLX_CONFIG_PATCHES[family]
        made[f"{name} (patched: {patch_name})"] = convert(patched_copy(source, out / "mlx-lm-source", patch),
                                                         out / "mlx-lm-patched-4bit-g64")
    return made


def patched_copy(source: Path, out: Path, patch: Callable[[dict], dict]) -> Path:
    """A copy of the checkpoint (its files linked) whose config.json is `patch` of the saved one."""
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.name != "config.json" and not (out / file.name).exists():
            (out / file.name).symlink_to(file)
    config = patch(json.loads((source / "config.json").read_text()))
    (out / "config.json").write_text(json.dumps(config, indent=2))  # math.inf as Infinity, which json.load reads
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


def mlx_state_bytes(path: Path, context: int) -> dict:
    """What mlx-lm keeps for one sequence of `context` tokens of this folder, from its own cache objects as
    siliconvert's MLX runner makes them (mlx-lm's model and cache; experts widened to float32 on mlx's CPU): the
    recurrent states (ArraysCache: conv and SSM / delta-rule states) and the KV caches' first `context` positions
    (mlx-lm allocates them in steps of 256), in the dtypes mlx-lm computes in."""
    from mlx_lm.models.cache import ArraysCache

    from siliconvert.validate.runners.mlx import MLXRunner

    runner = MLXRunner(path, {"engine": "mlx"})  # mlx-lm's quantized layers as they are
    runner.start(np.arange(context) % 100 + 10)
    recurrent = sum(layer.nbytes for layer in runner.cache if isinstance(layer, ArraysCache))
    kv = sum(keys.nbytes + values.nbytes for layer in runner.cache if not isinstance(layer, ArraysCache)
             for keys, values in [layer.keys_and_values()])
    return {"path": str(path), "recurrent_state_bytes": recurrent, "kv_cache_bytes": kv}


def anchor_ratios(row: dict) -> None:
    """Each quantized siliconvert artifact's mean KLD over its anchor's (the MLX anchor patched where mlx-lm refused
    the checkpoint as saved), set in its cell as `anchor_ratio` (None where the anchor has no figure)."""
    anchors = {name: cell for name, cell in row["anchors"].items() if "error" not in cell}
    for name, cell in row["siliconvert"].items():
        prefix = {"gguf Q4_K_M": "llama_model_quantize Q4_K_M", "mlx 4bit-g64": "mlx_lm.convert 4-bit g64"}.get(name)
        if prefix is None or "error" in cell:
            continue
        anchor = next((a for label, a in anchors.items() if label.startswith(prefix)), None)
        cell["anchor_ratio"] = (cell["mean_kld"] / anchor["mean_kld"] if anchor and anchor["mean_kld"] > 0
                                else None)


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| family | artifact | mean KLD | same top-1 | size | recurrent state | KV cache | × anchor | gates |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for family, row in rows.items():
        for side in ("siliconvert", "anchors"):
            for name, cell in row[side].items():
                label = name if side == "siliconvert" else f"anchor: {name}"
                if "error" in cell:
                    lines.append(f"| {family} | {label} | – | – | – | – | – | – | {cell['error']} |")
                    continue
                passed = "pass" if cell["passed"] else "FAIL"
                ratio = cell.get("anchor_ratio")
                versus = ("–" if ratio is None else f"{ratio:.2f}" if ratio <= ANCHOR_RATIO_GOAL
                          else f"{ratio:.2f} (> {ANCHOR_RATIO_GOAL:g})")
                lines.append(f"| {family} | {label} | {cell['mean_kld']:.2e} | {cell['same_top1']:.3f} | "
                             f"{cell['size_bytes']:,} B | {cell['recurrent_state_bytes']:,} B | "
                             f"{cell['kv_cache_bytes']:,} B | {versus} | {passed} |")
    return "\n".join(lines)

if __name__ == "__main__":
    try:
        main()
    except AnchorUnavailable as e:
        sys.exit(f"bench.hybrid: {e}")
