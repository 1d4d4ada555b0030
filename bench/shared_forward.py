"""The calibration and the reference in one streamed pass, or in two: `python -m bench.shared_forward [--source PATH]
[--repeats N] [--parts range,importance]`.

On the demo model (or `--source`), with the demo recipe's validation windows (builtin corpus, 1024 tokens of 256),
alternately: (separate) the calibration's forward, then the reference's in a pass of its own, as a run did before;
(shared) the calibration's forward with the reference's stream in it, then the reference read from the cache. Each
repeat prints both walls and the CPU seconds of their child processes (steadier than walls on a shared machine).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from siliconvert.calibration import BUILTIN, calibrate
from siliconvert.checkpoint import Checkpoint
from siliconvert.corpus import source_tokenizer, token_windows
from siliconvert.validate.reference import reference_forward, reference_logits


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(job) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of `job()`."""
    wall, cpu = time.perf_counter(), children_cpu_s()
    job()
    return time.perf_counter() - wall, children_cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="a checkpoint folder (default: the built-in demo model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="range", help="calibration parts, comma-separated (the demo needs range)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    if args.source is None:
        from siliconvert.demo import demo_checkpoint

        args.source = demo_checkpoint()
    checkpoint, parts = Checkpoint.open(args.source), set(args.parts.split(","))
    windows = token_windows(source_tokenizer(checkpoint.path), "builtin", args.tokens, args.context)
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as separate_dir, tempfile.TemporaryDirectory() as shared_dir:
            separate = measured(lambda: (calibrate(checkpoint, BUILTIN, parts),
                                         reference_logits(checkpoint, windows, Path(separate_dir))))
            shared = measured(lambda: (calibrate(checkpoint, BUILTIN, parts,
                                                 alongside=reference_forward(checkpoint, windows, Path(shared_dir))),
                                       reference_logits(checkpoint, windows, Path(shared_dir))))
        print(f"repeat {repeat + 1}: separate {separate[0]:.2f} s wall, {separate[1]:.2f} s child CPU; "
              f"shared {shared[0]:.2f} s wall, {shared[1]:.2f} s child CPU", flush=True)


if __name__ == "__main__":
    main()
