"""One front of every type: the fixed-type sweep and the planned sweep of the same model on the same corpus, drawn
together (issue #28). Each sweep is a `siliconvert sweep` result; a row both hold (the same format and quant, the
same bytes) is kept once.

    python -m bench.sweep_all bench/results/sweep-2026-12-07-demo-fixed.json \
        bench/results/sweep-2026-12-07-demo-planned.json --label 2026-12-07-demo-all
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from siliconvert.commands.sweep import write_sweep

RESULTS = Path(__file__).parent / "results"


def merged(fronts: list[dict]) -> dict:
    first = fronts[0]
    for front in fronts[1:]:
        if (front["source"], front["corpus"]) != (first["source"], first["corpus"]):
            raise SystemExit("the sweeps differ in model or corpus: their KLDs do not share a scale")
    rows = {(r["format"], r["quant"], r["size_bytes"]): r for front in reversed(fronts) for r in front["rows"]}
    skipped = {(s["format"], s["quant"]): s for front in fronts for s in front.get("skipped", [])}
    return {**first, "rows": sorted(rows.values(), key=lambda r: (r["format"], r["size_bytes"])),
            "skipped": list(skipped.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep.json files of one model and corpus")
    parser.add_argument("--label", required=True, help="results are bench/results/sweep-<label>.{json,md,png}")
    args = parser.parse_args()
    front = merged([json.loads(path.read_text()) for path in args.sweeps])
    with tempfile.TemporaryDirectory() as temp:
        write_sweep(Path(temp), front)
        for suffix in ("json", "md", "png"):
            text = Path(temp, f"sweep.{suffix}")
            if suffix == "md":  # the Markdown names its picture
                text.write_text(text.read_text().replace("(sweep.png)", f"(sweep-{args.label}.png)"))
            shutil.copy(text, RESULTS / f"sweep-{args.label}.{suffix}")
    print(f"{len(front['rows'])} rows → bench/results/sweep-{args.label}.{{json,md,png}}")


if __name__ == "__main__":
    main()
