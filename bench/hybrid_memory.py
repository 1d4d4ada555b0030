"""Conversion memory on hybrid checkpoints (issue #26: "conversion memory stays bounded by one layer").

One siliconvert recipe, Core ML FP16 + MLX 4-bit g64 + GGUF Q4_K_M with validation off, on the hybrid cases of
tests/families.py (a writer that refuses one is recorded with its refusal) and on the bench generator's `hybrid`
size (LFM2-2.6B's layers, 5.0 GB in bf16), each measured as bench/run.py measures a contender (bench.measure:
peak RSS of the process tree, wall, CPU; the checkpoint evicted from the page cache first). Each peak is set
beside the checkpoint's largest layer in float32 (what the writers hold while they convert one) and the whole
model's bytes.

    .venv/bin/python -m bench.hybrid_memory [--only lfm2,synthetic] [--keep]

Writes bench/results/hybrid-memory-<YYYY-MM-DD>.json (…-only-<parts>.json for some parts) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.run import (
    BENCH_DIR,
    COREML_TARGET,
    GGUF_TARGET,
    MLX_TARGET,
    RESULTS_DIR,
    WORK_DIR,
    Bench,
    Progress,
    demo_tokenizer_dir,
    fresh,
    machine_info,
    read_stages,
    remove,
    siliconvert_command,
    tool_versions,
    tree_bytes,
)
from bench.synthetic import cached_checkpoint

TEST_CASES = ("lfm2", "qwen3_5_moe_text", "granitemoehybrid")  # the hybrid cases of tests/families.py
SYNTHETIC = "synthetic"  # the generator's `hybrid` size
TARGETS = [COREML_TARGET, MLX_TARGET, GGUF_TARGET]
FLOAT32_BYTES = 4
LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class CheckpointBench(Bench):
    """A Bench on any checkpoint folder: its page cache is every safetensors file there (one file or shards)."""

    @property
    def checkpoint_files(self) -> list[Path]:
        return sorted(self.checkpoint.glob("*.safetensors"))


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the files' headers (no weights read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        shapes |= {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    return shapes


def layer_sizes(folder: Path) -> dict:
    """The checkpoint's parameters and bytes, its largest layer (all its tensors in float32, as the writers hold
    them while converting it, with its mixer from `layer_types`) and its largest tensor in float32."""
    shapes = safetensors_shapes(folder)
    per_layer: dict[int, int] = {}
    for name, dims in shapes.items():
        if match := LAYER_NAME.search(name):
            per_layer[int(match[1])] = per_layer.get(int(match[1]), 0) + math.prod(dims)
    layer, count = max(per_layer.items(), key=lambda item: item[1])
    config = json.loads((folder / "config.json").read_text())
    layer_types = config.get("layer_types") or config.get("text_config", {}).get("layer_types")
    largest_tensor = max(shapes, key=lambda name: math.prod(shapes[name]))
    parameters = sum(math.prod(dims) for dims in shapes.values())
    return {
        "architecture": config["architectures"][0],
        "layer_types": layer_types,
        "parameters": parameters,
        "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "float32_bytes": parameters * FLOAT32_BYTES,
        "largest_layer": {"layer": layer, "mixer": layer_types[layer] if layer_types else None,
                          "float32_bytes": count * FLOAT32_BYTES},
        "largest_tensor": {"name": largest_tensor, "shape": list(shapes[largest_tensor]),
                           "float32_bytes": math.prod(shapes[largest_tensor]) * FLOAT32_BYTES},
    }


def last_error(log: Path) -> str | None:
    """The log's last line naming an error (a writer's refusal names the trait it cannot honour)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "rror" in line or "refuse" in line]
    return lines[-1].strip() if lines else None


def convert(bench: Bench) -> dict:
    """The recipe, measured; its artifacts' bytes and timings.json's stages, then its output deleted."""
    recipe, output = bench.recipe("hybrid-memory", TARGETS, {"enabled": False})
    fresh(output)
    run = bench.measure("siliconvert", [*siliconvert_command(), str(recipe)])
    run["artifact_bytes"] = tree_bytes(output / "artifacts") if (output / "artifacts").is_dir() else None
    run["stages"] = read_stages(output)
    if not run["completed"]:
        run["error"] = last_error(BENCH_DIR.parent / run["log"])
    bench.discard(output)
    return run


def measure_checkpoint(name: str, folder: Path, keep: bool, say: Progress) -> dict:
    bench = CheckpointBench(f"hybrid-memory/{name}", folder, keep, say)
    remove(bench.out)
    sizes = layer_sizes(folder)
    run = convert(bench)
    peak = run["peak_rss_mb"] * 2**20
    return {
        "path": str(folder),
        **sizes,
        "run": run,
        "peak_vs_largest_layer_float32": round(peak / sizes["largest_layer"]["float32_bytes"], 2),
        "peak_vs_checkpoint_bytes": round(peak / sizes["bytes"], 3),
    }


def format_table(checkpoints: dict[str, dict]) -> str:
    rows = [f"{'checkpoint':<18} {'bytes':>10} {'layer f32':>10} {'peak MiB':>9} {'anon MiB':>9} {'× layer':>8} "
            f"{'× model':>8} {'wall s':>8}  exit"]
    for name, entry in checkpoints.items():
        run = entry["run"]
        layer = entry["largest_layer"]["float32_bytes"]
        rows.append(f"{name:<18} {entry['bytes'] / 2**20:>8.0f}Mi {layer / 2**20:>8.0f}Mi "
                    f"{run['peak_rss_mb']:>9.0f} {run['tree_anon_sampled_mb']:>9.0f} "
                    f"{entry['peak_vs_largest_layer_float32']:>8.2f} {entry['peak_vs_checkpoint_bytes']:>8.3f} "
                    f"{run['wall_s']:>8.1f}  {run['exit_code']}{' ' + run['error'] if run.get('error') else ''}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hybrid_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated, of {', '.join((*TEST_CASES, SYNTHETIC))} (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep each run's outputs under bench/work/")
    args = parser.parse_args(argv)
    parts = args.only.split(",") if args.only else [*TEST_CASES, SYNTHETIC]
    if unknown := sorted(set(parts) - {*TEST_CASES, SYNTHETIC}):
        parser.error(f"unknown parts {unknown}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as bench.run: a stopped bench stops its child
    say = Progress()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    for case in (part for part in parts if part in TEST_CASES):
        from siliconvert.demo import small_checkpoint  # torch and transformers only when a test case is asked
        from tests.families import FAMILY_CASES

        tokenizer, config = FAMILY_CASES[case]
        folders[case] = small_checkpoint(None, case, tokenizer, config=config)
    if SYNTHETIC in parts:
        folders[SYNTHETIC] = cached_checkpoint(WORK_DIR / "hybrid", "hybrid", demo_tokenizer_dir(),
                                               importlib.metadata.version("transformers"), say=say)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "parts": parts,
              "machine": machine_info(WORK_DIR), "tools": tool_versions(),
              "recipe": {"targets": TARGETS, "validate": {"enabled": False}}, "checkpoints": {}}
    for name, folder in folders.items():
        say(f"== {name}: {folder}")
        result["checkpoints"][name] = measure_checkpoint(name, folder, args.keep, say)
    RESULTS_DIR.mkdir(exist_ok=True)
    partial = "" if args.only is None else "-only-" + "-".join(parts)
    path = RESULTS_DIR / f"hybrid-memory-{time.strftime('%Y-%m-%d')}{partial}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result["checkpoints"]))
    print(f"\nresult: {path.relative_to(BENCH_DIR.parent)}")
    return 0 if all(entry["run"]["completed"] for entry in result["checkpoints"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
