"""GPTQ's share of rounding's output error, on the text it was fitted to and on text it was not (issue #28's
misprediction of Core ML plans of GPTQ-rounded weights on the real SmolLM2-135M).

The builtin calibration text's first 8192 tokens, in windows of 512, go through the model in float32 (transformers);
each chosen layer's linear inputs' second moments are summed apart for the first half of the windows (H_a) and the
second (H_b). Each weight is compressed as Core ML's passes compress it (its columns weighed by H_a's diagonal) and
rounded again by GPTQ against H_a (quantize/coreml.py, at each damping given); its output error tr(ΔW H ΔWᵀ) over
tr(W H Wᵀ) is measured under H_a (what the plan's `gptq_error_share` sees) and under H_b (text GPTQ did not see).

    .venv/bin/python -m bench.gptq_heldout [--model real] [--layers 0,7,14,21,29|all] [--damping 0.01,0.1]
                                           [--precisions int4,pal4] [--predict]

`--predict` (with `--layers all`): also each fixed GPTQ package's mean KLD as a Core ML plan predicts it (every
projection's and the head's `coreml_costs` at its measured gains, times GPTQ's share, plus the embedding looked up,
rounded to nearest), once with the share on the fitted half and once on the held-out half, to set beside the
packages' measured KLD.

Writes bench/results/gptq-heldout-<YYYY-MM-DD>-<model>[-predict].json and prints a line per damping and precision.
"""

from __future__ import annotations

import argparse
import datetime
import json

import numpy as np

from bench.plan import checkpoint_for
from bench.run import RESULTS_DIR

TOKENS, CONTEXT = 8192, 512
PROJECTIONS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


ALL_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")


def predicted_costs(path):
    """cost(name, weight, precision): a weight's rounding cost as a Core ML plan weighs it (`coreml_costs` with the
    calibration's importance and the gains measured on the model: Calibrations.outside_a_run, measured there where
    not cached); "model.embed_tokens.weight" (weight None) the table looked up, its columns alike, rounded to
    nearest (a split head leaves the lookup its own blob, which GPTQ does not round)."""
    from siliconvert.calibration import BUILTIN, IMPORTANCE, SENSITIVITY, Calibrations
    from siliconvert.checkpoint import Checkpoint, read_model_tensor
    from siliconvert.gains import EMBEDDING, HEAD
    from siliconvert.quantize.sensitivity import coreml_costs

    checkpoint = Checkpoint.open(path)
    measured = Calibrations.outside_a_run(checkpoint).get(BUILTIN, {IMPORTANCE, SENSITIVITY})
    table = read_model_tensor(checkpoint.tensor_infos["model.embed_tokens.weight"]).astype(np.float16)

    def cost(name: str, weight: np.ndarray | None, precision: str) -> float:
        if weight is None:
            weight, importance, gain, shrink = table, None, measured.gain(EMBEDDING), measured.shrink_gain(EMBEDDING)
        else:
            source = HEAD if name == "lm_head" else f"{name}.weight"
            importance, gain, shrink = measured.importance[source], measured.gain(source), measured.shrink_gain(source)
        (option,) = coreml_costs(name, weight.astype(np.float16), importance, gain, (precision,),
                                 shrink_gain=shrink).options
        return option.error

    return cost


def second_moments(model, windows: list[list[int]], names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each named linear layer's inputs' mean x xᵀ over the first half of `windows` and over the second."""
    import torch

    sums: dict[tuple[str, int], torch.Tensor] = {}
    half = [0]

    def hook(name: str):
        def record(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name, half[0]] = sums.get((name, half[0]), 0) + x.T @ x
        return record

    for name in names:
        model.get_submodule(name).register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for index, window in enumerate(windows):
            half[0] = int(index >= len(windows) // 2)
            model(torch.tensor([window]))
    tokens = len(windows) // 2 * CONTEXT
    return {name: (sums[name, 0].numpy() / tokens, sums[name, 1].numpy() / tokens) for name in names}


def relative_output_error(delta: np.ndarray, weight: np.ndarray, hessian: np.ndarray) -> float:
    return float(np.einsum("ij,jk,ik->", delta, hessian, delta) / np.einsum("ij,jk,ik->", weight, hessian, weight))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import siliconvert.quantize.gptq as gptq
    from siliconvert.calibration import calibration_text
    from siliconvert.quantize.coreml import compress, decompress, gptq_inverse, gptq_rounded

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="real")
    parser.add_argument("--layers", default="0,7,14,21,29")
    parser.add_argument("--damping", default="0.01,0.1")
    parser.add_argument("--precisions", default="int4,pal4")
    parser.add_argument("--predict", action="store_true")
    args = parser.parse_args()
    path = checkpoint_for(args.model)
    costs = predicted_costs(path) if args.predict else None
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = tokenizer(calibration_text("builtin")[1][:TOKENS * 6], add_special_tokens=False,
                    verbose=False)["input_ids"][:TOKENS]
    windows = [ids[start:start + CONTEXT] for start in range(0, len(ids) - CONTEXT + 1, CONTEXT)]
    layers = range(model.config.num_hidden_layers) if args.layers == "all" else map(int, args.layers.split(","))
    projections = ALL_PROJECTIONS if args.predict else PROJECTIONS
    names = [f"model.layers.{layer}.{projection}" for layer in layers for projection in projections]
    names.append("lm_head")  # the head's gain is the largest (93 per unit r on the real model, a layer's ~0.1–2)
    moments = second_moments(model, windows, names)
    rows = []
    for damping in map(float, args.damping.split(",")):
        gptq.DAMPING = damping  # read by inverse_factor at each call
        precisions = args.precisions.split(",")
        totals = {(group, precision): np.zeros(4) for group in ("layers", "head") for precision in precisions}
        predicted = {precision: np.zeros(2) for precision in precisions}
        for name in names:
            fitted, held_out = moments[name]
            weight = model.get_submodule(name).weight.detach().numpy().astype(np.float16).astype(np.float32)
            inverse = gptq_inverse(fitted)
            for precision in precisions:
                total = totals["head" if name == "lm_head" else "layers", precision]
                made = compress(weight, precision, np.diag(fitted).astype(np.float32))
                rounding = decompress(made).reshape(weight.shape) - weight
                rounded = decompress(gptq_rounded(weight, made, fitted, precision, inverse=inverse))
                carried = rounded.reshape(weight.shape) - weight
                errors = [relative_output_error(delta, weight, hessian)
                          for delta in (rounding, carried) for hessian in (fitted, held_out)]
                total += errors
                if costs is not None:
                    cost = costs(name, weight, precision)
                    predicted[precision] += [cost * errors[2] / errors[0], cost * errors[3] / errors[1]]
                rows.append({"damping": damping, "weight": name, "precision": precision,
                             "rounding_fitted": errors[0], "rounding_held_out": errors[1],
                             "gptq_fitted": errors[2], "gptq_held_out": errors[3]})
        for (group, precision), (rounding_fitted, rounding_held_out, fitted, held_out) in totals.items():
            print(f"damping {damping:g} {precision} {group}: summed relative output error, rounding "
                  f"{rounding_fitted:.4g} / {rounding_held_out:.4g}, GPTQ {fitted:.4g} / {held_out:.4g} "
                  f"(fitted text / held-out text): GPTQ's share {fitted / rounding_fitted:.3f} / "
                  f"{held_out / rounding_held_out:.3f}", flush=True)
        for precision, (fitted, held_out) in predicted.items():
            if costs is not None:
                lookup = costs("model.embed_tokens.weight", None, precision)
                rows.append({"damping": damping, "precision": precision, "predicted_fitted": fitted + lookup,
                             "predicted_held_out": held_out + lookup, "lookup": lookup})
                print(f"damping {damping:g} {precision}: a fixed package's mean KLD as a plan predicts it, GPTQ's "
                      f"share fitted {fitted + lookup:.4g}, held out {held_out + lookup:.4g} (the lookup, rounded to "
                      f"nearest: {lookup:.4g})", flush=True)
    out = RESULTS_DIR / f"gptq-heldout-{datetime.date.today()}-{args.model}{'-predict' if args.predict else ''}.json"
    out.write_text(json.dumps({"model": args.model, "tokens": TOKENS, "context": CONTEXT,
                               "command": "python -m bench.gptq_heldout " + " ".join(
                                   f"--{k} {v}" for k, v in vars(args).items()), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
