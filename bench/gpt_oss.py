"""gpt-oss in every format beside llama.cpp's converter and mlx_lm.convert (issue #27), with bench.hybrid's machinery.

Four sources built from tests/families.py's gpt-oss case: its bfloat16 checkpoint as transformers 5.25 saves it, and
the same with its experts in MXFP4 as the hub lays them out (`gpt_oss_mxfp4`); each with YaRN's correction range
untruncated (as gpt-oss-20b's config) and truncated (what llama.cpp and mlx-lm compute). On each: one siliconvert
recipe (GGUF F16 + Q4_K_M, MLX 4-bit g64, Core ML FP16; a refused format recorded with its refusal), then
convert_hf_to_gguf F16 (its pre-tokenizer lookup answered as bench.hybrid does), llama_model_quantize Q4_K_M and
mlx_lm.convert 4-bit g64, all scored by `siliconvert validate` on the same windows. The untruncated sources' MLX
target takes `model_file: faithful` (siliconvert's convert/mlx_models/gpt_oss.py: mlx-lm's own file always truncates);
each expert model's row carries its router agreement (`same_experts`: the share of tokens whose experts are
transformers' own in every sparse layer).

What untruncated YaRN costs GGUF, which cannot express it (llama.cpp's openai-moe graph passes no rope_freqs and its
ramp ends are whole dimensions): the gpt_oss case trained with gpt-oss-20b's own rope (head 64, θ 150000, factor 32,
beta 32 / 1, original context 4096: a ramp over dimensions 8.09 to 17.4, which llama.cpp rounds out to 8 to 18),
written as F16 and scored on `--yarn-context`-token windows as shipped (untruncated) and with its config edited to
truncate: true (what llama.cpp computes): `gguf_yarn_cost`.

    .venv/bin/python -m bench.gpt_oss [--tokens 1024] [--context 256] [--yarn-context 512]

Writes bench/results/gpt-oss-<YYYY-MM-DD>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil

from bench import hybrid
from bench.families import Notes
from bench.run import RESULTS_DIR, WORK_DIR, llama_cpp_converter
from siliconvert.demo import small_checkpoint
from tests.families import FAMILY_CASES, GPT_OSS_20B_ROPE, TRUNCATED_YARN, gpt_oss_mxfp4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--yarn-context", type=int, default=512, help="window of the GGUF YaRN cost's scoring")
    args = parser.parse_args()
    tokenizer, config = FAMILY_CASES["gpt_oss"]
    mxfp4 = gpt_oss_mxfp4(WORK_DIR / "gpt_oss" / "mxfp4")
    mxfp4_truncated = WORK_DIR / "gpt_oss" / "mxfp4-truncated"
    if not mxfp4_truncated.exists():
        shutil.copytree(mxfp4, mxfp4_truncated)
        settings = json.loads((mxfp4_truncated / "config.json").read_text())
        settings["rope_parameters"]["truncate"] = True
        (mxfp4_truncated / "config.json").write_text(json.dumps(settings, indent=2))
    truncated = config | TRUNCATED_YARN["gpt_oss"]
    sources = {"bf16 untruncated": small_checkpoint(None, "gpt_oss", tokenizer, config=config),
               "bf16 truncated": small_checkpoint(None, "gpt_oss", tokenizer, config=truncated),
               "mxfp4 untruncated": mxfp4, "mxfp4 truncated": mxfp4_truncated}
    notes = Notes()
    rows: dict[str, dict] = {}
    path = RESULTS_DIR / f"gpt-oss-{datetime.date.today().isoformat()}.json"
    result = {"tokens": args.tokens, "context": args.context, "tools": notes.tool_notes, "sources": rows}
    with llama_cpp_converter(notes) as converter:
        for name, source in sources.items():
            key = "gpt_oss-" + name.replace(" ", "-")
            targets = hybrid.default_targets(args)
            if "untruncated" in name:  # mlx-lm's gpt_oss always truncates: siliconvert's own file
                targets["mlx"] |= {"model_file": "faithful"}
            mine = with_router_agreement(hybrid.ours(key, source, args, targets), key)
            rows[name] = {"siliconvert": mine, "anchors": hybrid.anchors(key, source, converter, args, mine)}
            path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["gguf_yarn_cost"] = gguf_yarn_cost(args)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    notes.say(f"written: {path}")


def with_router_agreement(mine: dict, key: str) -> dict:
    """hybrid.ours's figures, each artifact's with its report's router agreement (same_experts, overlap)."""
    report = hybrid.OUT / key / "siliconvert" / "report.json"
    if not report.is_file():
        return mine
    for artifact in json.loads(report.read_text())["artifacts"]:
        router = artifact.get("router_agreement") or {}
        if router.get("measured"):
            mine[f"{artifact['format']} {artifact['quant']}"] |= {
                "router_same_experts": router["same_experts"], "router_overlap": router["overlap"]}
    return mine


def gguf_yarn_cost(args: argparse.Namespace) -> dict:
    """F16 GGUF's figures on the gpt_oss case trained with gpt-oss-20b's rope, as shipped (untruncated: llama.cpp
    computes another function) and with truncate: true (llama.cpp's own YaRN): the difference is what the
    rounding costs."""
    tokenizer, config = FAMILY_CASES["gpt_oss"]
    untruncated = small_checkpoint(None, "gpt_oss", tokenizer, config=config | GPT_OSS_20B_ROPE)
    truncated = hybrid.patched_copy(untruncated, WORK_DIR / "gpt_oss" / "20b-rope-truncated", lambda settings: (
        settings | {"rope_parameters": settings["rope_parameters"] | {"truncate": True}}))
    yarn_args = argparse.Namespace(tokens=args.tokens, context=args.yarn_context)
    return {"rope": GPT_OSS_20B_ROPE, "context": args.yarn_context} | {
        name: hybrid.ours(f"gpt_oss-20b-rope-{name}", source, yarn_args,
                          {"gguf": {"format": "gguf", "quants": ["F16"]}})["gguf F16"]
        for name, source in (("untruncated", untruncated), ("truncated", truncated))}


if __name__ == "__main__":
    main()
