"""Whether AWQ-style scaling helps MLX's affine 4-bit here (issue #28): each dense layer's output error
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), H its calibration inputs' second moments, rounded to nearest, by GPTQ, and each after
AWQ's per-column scaling s = rms(x)^α (normalised as mlx_lm/quant/awq.py does, α searched on a grid of 10 for the
least error; the scale would be folded into the previous op: a norm's weight or the previous linear's rows).
The layer's linear output error is what AWQ's search minimises on a block's output, less the attention between.

    .venv/bin/python -m bench.mlx_awq [--models qwen3,olmo2] [--bits 4] [--group-size 64]

Prints per layer and summed errors; writes bench/results/mlx-awq-<YYYY-MM-DD>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json

import mlx.core as mx
import numpy as np

from bench.mlx_quants import source_of
from bench.run import RESULTS_DIR
from siliconvert.calibration import BUILTIN, Calibrations
from siliconvert.checkpoint import Checkpoint
from siliconvert.quantize.gptq import gptq_quantize

ALPHAS = np.linspace(0.1, 1.0, 10)


def layer_errors(weight: np.ndarray, hessian: np.ndarray, bits: int, group_size: int) -> dict[str, float]:
    def error(rounded: np.ndarray) -> float:
        delta = rounded - weight
        return float(np.einsum("ij,jk,ik->", delta, hessian, delta) / np.einsum("ij,jk,ik->", weight, hessian, weight))

    def nearest(w: np.ndarray) -> np.ndarray:
        packed, scales, biases = mx.quantize(mx.array(w).astype(mx.float16), group_size, bits)
        return np.asarray(mx.dequantize(packed, scales, biases, group_size, bits).astype(mx.float32))

    def gptq(w: np.ndarray, h: np.ndarray) -> np.ndarray:
        arrays = gptq_quantize(w, h, bits, group_size)
        return np.asarray(mx.dequantize(arrays["weight"], arrays["scales"], arrays["biases"], group_size,
                                        bits).astype(mx.float32))

    rms = np.sqrt(np.maximum(np.diag(hessian), 1e-12))
    scalings = [(s := rms**alpha) / np.sqrt(s.max() * s.min()) for alpha in ALPHAS]
    awq = min(error(nearest(weight * s) / s) for s in scalings)
    awq_gptq = min(error(gptq(weight * s, hessian / np.outer(s, s)) / s) for s in scalings)
    return {"rtn": error(nearest(weight)), "awq": awq, "gptq": error(gptq(weight, hessian)), "awq+gptq": awq_gptq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen3,olmo2")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    result = {"date": datetime.date.today().isoformat(), "bits": args.bits, "group_size": args.group_size,
              "models": {}}
    for model in args.models.split(","):
        checkpoint = Checkpoint.open(source_of(model))
        hessians = Calibrations.outside_a_run(checkpoint).hessians(BUILTIN)
        layers = {}
        for info, array in checkpoint.tensors():
            hessian = hessians.get(info.name)
            if hessian is None or array.ndim != 2 or array.shape[1] % args.group_size:
                continue
            layers[info.name] = layer_errors(array.astype(np.float32), hessian, args.bits, args.group_size)
            print(model, info.name, {k: round(v, 6) for k, v in layers[info.name].items()}, flush=True)
        total = {method: sum(errors[method] for errors in layers.values()) for method in ("rtn", "awq", "gptq",
                                                                                          "awq+gptq")}
        print(model, "summed", total)
        result["models"][model] = {"layers": layers, "summed": total}
    path = RESULTS_DIR / f"mlx-awq-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
