"""siliconvert's own MLX model files (`model_file: faithful`) beside mlx-lm's, on tests/families.py's checkpoints.

For Gemma 2 (a 24-token window) and Phi-3 (LongRoPE, original context 256; and the same weights with it at 64, so
the windows reach past it), each row is the mean KLD to transformers' float32 logits on 2 held-out windows of 96
tokens, run by siliconvert's MLX runner (mlx-lm on mlx's CPU, a quantized folder dequantized by mlx), of:
- the `model_file: faithful` folder (float16, and 4-bit g64);
- the very same folder run by mlx-lm's own model file (config.json's model_file and the file taken out);
- mlx_lm.convert's own folder from the checkpoint as saved (`--dtype float16`, or `-q --q-bits 4 --q-group-size 64`).

    .venv/bin/python -m bench.mlx_model_files [--out /tmp/mlx-model-files]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CASES = ("gemma2", "phi3", "phi3, original context 64")


def source(case: str, out: Path) -> Path:
    from families import FAMILY_CASES

    from siliconvert.demo import small_checkpoint

    family = case.split(",")[0]
    tokenizer, config = FAMILY_CASES[family]
    path = small_checkpoint(None, family, tokenizer, config=config)
    if case == "phi3, original context 64":
        edited = out / "phi3-original64"
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(path, edited)
        config = json.loads((edited / "config.json").read_text())
        config["original_max_position_embeddings"] = config["rope_parameters"]["original_max_position_embeddings"] = 64
        (edited / "config.json").write_text(json.dumps(config))
        return edited
    return path


def mean_kld(reference: np.ndarray, folder: Path, windows: np.ndarray) -> float:
    from siliconvert.validate.metrics import compare
    from siliconvert.validate.runners.mlx import MLXRunner

    logits = MLXRunner(folder, {}).logits_many(windows)
    vocab = reference.shape[-1]
    scores, _ = compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                        windows[:, 1:].reshape(-1))
    return scores.mean_kld


def with_mlx_lms_file(folder: Path) -> Path:
    """A copy of the folder that mlx-lm runs with its own model file."""
    copy = folder.with_name(folder.name + "-mlx-lm-file")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / config.pop("model_file")).unlink()
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def mlx_lm_convert(checkpoint: Path, folder: Path, bits: int) -> Path | str:
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(checkpoint), "--mlx-path", str(folder)]
    command += ["-q", "--q-bits", "4", "--q-group-size", "64"] if bits == 4 else ["--dtype", "float16"]
    result = subprocess.run(command, capture_output=True, text=True)
    return folder if result.returncode == 0 else "refused: " + result.stderr.strip().splitlines()[-1]


def main() -> None:
    from conftest import build_mlx, reference_logits_for
    from test_mlx import held_out_windows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlx-model-files"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| checkpoint | MLX | faithful file | mlx-lm's file, same folder | mlx_lm.convert |\n|---|---|---|---|---|")
    for case in CASES:
        checkpoint = source(case, args.out)
        windows = held_out_windows(checkpoint)
        reference = reference_logits_for(checkpoint, windows)
        for bits, target in ((16, {"bits": 16}), (4, {"bits": 4, "group_size": 64})):
            work = args.out / f"{checkpoint.name}-{bits}"
            shutil.rmtree(work, ignore_errors=True)
            folder = build_mlx(checkpoint, work, model_file="faithful", **target).path
            theirs = mlx_lm_convert(checkpoint, work / "mlx_lm.convert", bits)
            cells = [mean_kld(reference, folder, windows), mean_kld(reference, with_mlx_lms_file(folder), windows),
                     mean_kld(reference, theirs, windows) if isinstance(theirs, Path) else theirs]
            shown = [f"{cell:.2g}" if isinstance(cell, float) else cell for cell in cells]
            print(f"| {case} | {'float16' if bits == 16 else '4-bit g64'} | {' | '.join(shown)} |", flush=True)


if __name__ == "__main__":
    main()
