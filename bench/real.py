"""Real weights: issue #24's recipe on SmolLM2-135M-Instruct, beside the anchors, all scored alike.

The checkpoint is rebuilt from the GGUF a registry package ships (siliconvert/realweights.py). One siliconvert
recipe (MLX 4-bit g64, GGUF F16 / Q8_0 / Q4_K_M, Core ML FP16), then mlx_lm.convert (16-bit, 4-bit g64) and
llama.cpp's convert_hf_to_gguf + quantizer (F16, Q8_0, Q4_K_M), every artifact scored by `siliconvert validate`
on the same 1024 held-out tokens in windows of 256 against the same float32 transformers reference. This is the
full recipe on real weights that `make test` leaves out (it takes about 10 minutes on 2 cores, the anchors
included); the tests run a GGUF recipe on the same checkpoint (tests/test_realweights.py).

    make bench-real          # or: .venv/bin/python -m bench.real [--tokens 1024] [--context 256]

Writes bench/results/real-<YYYY-MM-DD>.json and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json

from bench.families import Notes, anchors, markdown, ours
from bench.run import RESULTS_DIR, WORK_DIR, llama_cpp_converter
from siliconvert.realweights import NAME, real_checkpoint

QUANTS = ("F16", "Q8_0", "Q4_K_M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    notes = Notes()
    source = real_checkpoint()
    out = WORK_DIR / "real"
    with llama_cpp_converter(notes) as converter:
        notes.say(f"== {NAME}: {source}")
        row = {"siliconvert": ours(NAME, source, args, QUANTS, out),
               "anchors": anchors(NAME, source, converter, args, QUANTS[1:], out)}
    result = {"date": datetime.date.today().isoformat(), "tokens": args.tokens, "context": args.context,
              "tools": notes.tool_notes, "models": {NAME: row}}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"real-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["models"]))
    notes.say(f"written: {path}")


if __name__ == "__main__":
    main()
