"""What sampling rows saves a plan, and what it costs the estimate (#17, quantize/sensitivity.py `sample_rows`).

On one 4096 × 11008 float32 tensor (a 7B MLP's shape), each format's cost function (`gguf_costs`, `mlx_costs`,
`coreml_costs`) is timed measuring the whole tensor and measuring sampled rows at a few budgets, and each
candidate's sampled relative error (the one draw of rows `sample_rows` takes) is compared with the whole one. Two
tensors: plain N(0, 1), and one with the structure trained weights have (rows of lognormal scale, 1% of columns ten
times larger) under an importance vector with a heavy tail (lognormal, σ 1.5). On the structured one the estimate's
spread is also measured over DRAWS other draws of the strata's rows, from each row's error in the whole tensor's
quantization. The time of a whole plan per format is extrapolated from the seconds per measured weight (the slower
tensor's) for Mistral-7B and Qwen3-30B-A3B (every planned matrix and expert stack; a stack's time taken as a
dense tensor's of its measured weights).

    .venv/bin/python -m bench.plan_sampling [--budgets 19,20,21] [--only gguf,mlx,coreml]

Result: bench/results/plan-sampling-<YYYY-MM-DD>.json (`…-only-<formats>.json` for some formats), and a table
on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

SHAPE = (4096, 11008)
DRAWS = 300
# The planned tensors' shapes and how many of each: Mistral-7B (32 layers, embedding and head) and Qwen3-30B-A3B
# (48 layers of 128 experts, [experts,] rows × columns; its routers are not planned)
MODELS = {"mistral_7b": {(4096, 4096): 64, (1024, 4096): 64, (14336, 4096): 64, (4096, 14336): 32, (32000, 4096): 2},
          "qwen3_30b_a3b": {(4096, 2048): 48, (512, 2048): 96, (2048, 4096): 48, (128, 768, 2048): 96,
                            (128, 2048, 768): 48, (151936, 2048): 2}}
RESULTS = Path(__file__).parent / "results"


def tensors() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name → (weight, importance): plain Gaussian, and with rows and columns of unequal scale."""
    rng = np.random.default_rng(0)
    plain = rng.standard_normal(SHAPE, dtype=np.float32)
    structured = rng.standard_normal(SHAPE, dtype=np.float32)
    structured *= rng.lognormal(0.0, 0.5, (SHAPE[0], 1)).astype(np.float32)
    structured[:, rng.choice(SHAPE[1], SHAPE[1] // 100, replace=False)] *= 10
    return {"gaussian": (plain, np.ones(SHAPE[1], np.float32)),
            "structured": (structured, rng.lognormal(0.0, 1.5, SHAPE[1]).astype(np.float32))}


def cost_function(fmt: str, quantizer):
    """A function (weight, importance, budget) → TensorCosts for `fmt`, as the writers call it (Core ML's weight
    is fp16 there)."""
    from siliconvert.quantize.sensitivity import coreml_costs, gguf_costs, mlx_costs

    if fmt == "gguf":
        return lambda w, a, budget: gguf_costs("t", w, a, quantizer, sample_budget=budget)
    if fmt == "mlx":
        return lambda w, a, budget: mlx_costs("t", w, a, 2, sample_budget=budget)
    return lambda w, a, budget: coreml_costs("t", w, a, sample_budget=budget)


def row_errors(fmt: str, weight: np.ndarray, importance: np.ndarray, quantizer) -> dict[str, np.ndarray]:
    """candidate → [Σ_j a_j (W − Q)²_ij, Σ_j a_j W²_ij] of every row i, the whole tensor quantized by the format's
    own quantizer (as the cost functions quantize it)."""
    import gguf
    import mlx.core as mx

    from siliconvert.quantize.coreml import compress, decompress
    from siliconvert.quantize.sensitivity import COREML_CANDIDATES, GGUF_CANDIDATES, MLX_CANDIDATES, mlx_option_name

    approximations = {}
    if fmt == "gguf":
        for qtype in GGUF_CANDIDATES:
            data = quantizer.submit(weight, qtype, importance).result()
            approximations[qtype.name] = gguf.quants.dequantize(data, qtype)
    elif fmt == "mlx":
        for bits, group in MLX_CANDIDATES:
            packed = mx.quantize(mx.array(weight), group, bits)
            approximations[mlx_option_name(bits, group)] = np.asarray(mx.dequantize(*packed, group, bits))
    else:
        approximations = {p: decompress(compress(weight, p)) for p in COREML_CANDIDATES if p != "fp16"}
    exact = weight.astype(np.float64)
    total = np.square(exact) @ importance
    return {kind: np.stack([np.square(exact - approx) @ importance, total]) for kind, approx in approximations.items()}


def spread(errors: dict[str, np.ndarray], budget: int) -> dict[str, float]:
    """The sampled estimate's relative deviation from the whole tensor's over DRAWS draws of `sample_rows`'s
    strata (one row each at a random offset): its standard deviation and 99th percentile of |deviation|, the
    worst candidate's."""
    rows = SHAPE[0]
    count = measured_weights(SHAPE, budget) // SHAPE[1]
    starts = np.arange(count + 1) * rows // count
    picks = np.stack([starts[:-1] + np.random.default_rng(seed).integers(0, np.diff(starts))
                      for seed in range(DRAWS)])
    deviations = np.stack([row[0][picks].sum(1) / row[1][picks].sum(1) / (row[0].sum() / row[1].sum()) - 1
                           for row in errors.values()])
    return {"rows": count, "sd": float(deviations.std(1).max()),
            "p99_abs": float(np.quantile(np.abs(deviations), 0.99, axis=1).max())}


def measured_weights(shape: tuple[int, ...], budget: int | None) -> int:
    """Weights `sample_rows` measures of a tensor of `shape` (a broadcast zero: nothing is allocated but the rows)."""
    from siliconvert.quantize.sensitivity import sample_rows

    return sample_rows(np.broadcast_to(np.float32(0), shape), budget).size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="19,20,21", help="log2 of the weights measured per tensor")
    parser.add_argument("--only", default="gguf,mlx,coreml")
    args = parser.parse_args()
    budgets = [1 << int(b) for b in args.budgets.split(",")]
    formats = args.only.split(",")
    result: dict = {"date": datetime.date.today().isoformat(), "shape": SHAPE,
                    "machine": {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                                "load_1min_at_start": os.getloadavg()[0], "cpu": platform.processor()},
                    "formats": {}}
    from siliconvert.quantize.gguf import TensorQuantizer

    arrays = tensors()
    quantizer = TensorQuantizer()
    for fmt in formats:
        costs_of = cost_function(fmt, quantizer)
        runs: dict = {}
        for tensor, (weight, importance) in arrays.items():
            if fmt == "coreml":
                weight = weight.astype(np.float16)
            start = time.perf_counter()
            whole = costs_of(weight, importance, None)
            whole_s = time.perf_counter() - start
            runs[tensor] = {"whole_s": whole_s, "sampled": {}}
            print(f"{fmt} {tensor}: whole {whole_s:.1f} s")
            for budget in budgets:
                start = time.perf_counter()
                sampled = costs_of(weight, importance, budget)
                seconds = time.perf_counter() - start
                errors = {o.kind: o.error for o in sampled.options}
                relative = {o.kind: errors[o.kind] / o.error - 1 for o in whole.options if o.error}
                same_bytes = [o.nbytes for o in whole.options] == [o.nbytes for o in sampled.options]
                same_order = (sorted(relative, key=lambda k: errors[k])
                              == sorted(relative, key=lambda k: next(o.error for o in whole.options if o.kind == k)))
                runs[tensor]["sampled"][budget] = {"seconds": seconds, "same_bytes": same_bytes,
                                                   "same_order": same_order, "relative_error": relative,
                                                   "max_abs_relative_error": max(map(abs, relative.values()))}
                print(f"  2^{budget.bit_length() - 1}: {seconds:.2f} s, worst |Δ| "
                      f"{max(map(abs, relative.values())):.3f}, bytes equal {same_bytes}, order kept {same_order}")
        weight, importance = arrays["structured"]
        errors = row_errors(fmt, weight.astype(np.float16) if fmt == "coreml" else weight, importance, quantizer)
        runs["structured"]["spread"] = {budget: spread(errors, budget) for budget in budgets}
        for budget, figures in runs["structured"]["spread"].items():
            print(f"  structured, {DRAWS} draws at 2^{budget.bit_length() - 1} ({figures['rows']} rows): worst "
                  f"candidate's sd {figures['sd']:.3f}, p99 |Δ| {figures['p99_abs']:.3f}")
        # seconds per measured weight, the slower tensor's
        whole_rate = max(r["whole_s"] for r in runs.values()) / (SHAPE[0] * SHAPE[1])
        rates = {budget: max(r["sampled"][budget]["seconds"] for r in runs.values()) / measured_weights(SHAPE, budget)
                 for budget in budgets}
        extrapolated = {}
        for model, shapes in MODELS.items():
            extrapolated[model] = {"whole_s": whole_rate * sum(n * int(np.prod(shape)) for shape, n in shapes.items())}
            for budget, rate in rates.items():
                extrapolated[model][f"sampled_2^{budget.bit_length() - 1}_s"] = rate * sum(
                    n * measured_weights(shape, budget) for shape, n in shapes.items())
            print(f"  {model} plan: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in extrapolated[model].items()))
        result["formats"][fmt] = {"tensors": runs, "plan_s": extrapolated}
    quantizer.close()
    RESULTS.mkdir(exist_ok=True)
    only = "" if formats == ["gguf", "mlx", "coreml"] else "-only-" + "-".join(formats)
    path = RESULTS / f"plan-sampling-{result['date']}{only}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
