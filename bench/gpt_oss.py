"""gpt-oss in every format beside llama.cpp's converter and mlx_lm.convert (issue #27), with bench.hybrid's machinery.

Four sources built from tests/families.py's gpt-oss case: its bfloat16 checkpoint as transformers 5.25 saves it, and
the same with its experts in MXFP4 as the hub lays them out (`gpt_oss_mxfp4`); each with YaRN's correction range
untruncated (as gpt-oss-20b's config) and truncated (what llama.cpp and mlx-lm compute). On each: one siliconvert
recipe (GGUF F16 + Q4_K_M, MLX 4-bit g64, Core ML FP16; a refused format recorded with its refusal), then
convert_hf_to_gguf F16 (its pre-tokenizer lookup answered as bench.hybrid does), llama_model_quantize Q4_K_M and
mlx_lm.convert 4-bit g64, all scored by `siliconvert validate` on the same windows.

    .venv/bin/python -m bench.gpt_oss [--tokens 1024] [--context 256]

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
from tests.families import FAMILY_CASES, TRUNCATED_YARN, gpt_oss_mxfp4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
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
    with llama_cpp_converter(notes) as converter:
        for name, source in sources.items():
            key = "gpt_oss-" + name.replace(" ", "-")
            mine = hybrid.ours(key, source, args)
            rows[name] = {"siliconvert": mine, "anchors": hybrid.anchors(key, source, converter, args, mine)}
            path.write_text(json.dumps({"tokens": args.tokens, "context": args.context, "tools": notes.tool_notes,
                                        "sources": rows}, indent=2, default=str) + "\n")
    notes.say(f"written: {path}")


if __name__ == "__main__":
    main()
