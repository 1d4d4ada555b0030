"""Time and peak memory of the Core ML writer alone over a checkpoint's stream (not a test: run by hand, #7).

    .venv/bin/python -m bench.coreml_writer model /tmp/llama-1b            # random Llama, ~1 GB bf16
    .venv/bin/python -m bench.coreml_writer model /tmp/mistral-2l --mistral-shapes   # 2 layers, 1.4 GB
    .venv/bin/python -m bench.coreml_writer measure /tmp/llama-1b /tmp/out [--chunks 4] [--precision fp16,int8]
    .venv/bin/python -m bench.coreml_writer measure /tmp/llama-1b /tmp/out --stream-only

`measure` reports the writer's own time (inside add and finish; reading the checkpoint is not counted), the
process's peak RSS (VmHWM, reset after imports) and, for comparison, the time of a plain sequential write of as
many bytes as the writer wrote (write + fsync, same disk). --stream-only reads the stream with no writer: the
difference between the two peaks is what the writer holds. Weights are never committed: build them in /tmp.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import time
from pathlib import Path


def make_model(folder: Path, mistral_shapes: bool) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    if mistral_shapes:  # Mistral-7B's tensors, two layers of them
        model = MistralForCausalLM(MistralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False, sliding_window=None))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
            num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False))
    model.save_pretrained(folder)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(32000)}, unk_token="w0")).save(str(folder / "tokenizer.json"))


def status(field: str) -> int:
    return int(re.search(rf"{field}:\s*(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def measure(source: Path, out: Path, chunks: str, precision: list[str], stream_only: bool) -> str:
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.convert.coreml import CoreMLWriter
    from siliconvert.recipe import CoreMLTarget

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    checkpoint = Checkpoint.open(source)
    target = CoreMLTarget(format="coreml", context=512, chunks=chunks if chunks == "auto" else int(chunks),
                          precision=precision)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    baseline = status("VmRSS")
    writer = None if stream_only else CoreMLWriter(checkpoint, target, out, "model")
    inside = 0.0
    for info, array in checkpoint.tensors():
        start = time.perf_counter()
        if writer is not None:
            writer.add(info, array)
        inside += time.perf_counter() - start
        del array
    start = time.perf_counter()
    artifacts = writer.finish() if writer is not None else []
    inside += time.perf_counter() - start
    peak = status("VmHWM")
    report = (f"{'stream only' if writer is None else 'writer'}, chunks={chunks}, {','.join(precision)}: peak RSS "
              f"{peak / 2**20:.0f} MiB (+{(peak - baseline) / 2**20:.0f} MiB over {baseline / 2**20:.0f} MiB)")
    written = sum(f.stat().st_size for a in artifacts for f in a.path.rglob("*") if f.is_file())
    if not written:
        return report
    block, plain = bytes(64 << 20), out / "plain.bin"
    start = time.perf_counter()
    with plain.open("wb") as f:
        for offset in range(0, written, len(block)):
            f.write(block[: min(len(block), written - offset)])
        f.flush()
        os.fsync(f.fileno())
    sequential = time.perf_counter() - start
    plain.unlink()
    return (f"{report}; writer {inside:.1f} s for {written / 1e9:.2f} GB, plain write+fsync {sequential:.1f} s, "
            f"ratio {inside / sequential:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="build a random checkpoint to measure with")
    model.add_argument("folder", type=Path)
    model.add_argument("--mistral-shapes", action="store_true")
    run = commands.add_parser("measure", help="run the Core ML writer over a checkpoint's stream")
    run.add_argument("source", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--chunks", default="auto")
    run.add_argument("--precision", default="fp16")
    run.add_argument("--stream-only", action="store_true")
    args = parser.parse_args()
    if args.command == "model":
        make_model(args.folder, args.mistral_shapes)
    else:
        print(measure(args.source, args.out, args.chunks, args.precision.split(","), args.stream_only))


if __name__ == "__main__":
    main()
