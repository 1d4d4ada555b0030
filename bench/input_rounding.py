"""What rounding every matmul's input as llama.cpp's CPU kernels do costs, in transformers' own forward: mean KLD
against the clean forward on the plan bench's 2 held-out windows of 256, each linear layer's input rounded to Q8_0
(int8 blocks of 32) or Q8_K (blocks of 256, where the width allows; Q8_0 elsewhere, as the fallback types round),
beside the sum of the per-weight shares the calibration measured (siliconvert/gains.py `MeasuredGains.inputs`).

    PYTHONPATH=. .venv/bin/python -m bench.input_rounding [--models real,demo,FOLDER]
"""
import argparse
import json
import sys

import numpy as np
import torch

sys.path.insert(0, "tests")

from bench.plan import checkpoint_for
from siliconvert.calibration import BUILTIN, SENSITIVITY, Calibrations
from siliconvert.checkpoint import Checkpoint
from siliconvert.gains import INPUT_ROUNDINGS, Q8_0
from siliconvert.streamed import CheckpointWeights, streamed_logits
from siliconvert.textdata import heldout_text


def rounded_logits(checkpoint: Checkpoint, windows: np.ndarray, kind: str | None) -> np.ndarray:
    def prepare(model) -> None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda _module, inputs: (round_input(inputs[0]),))

    def round_input(x: torch.Tensor) -> torch.Tensor:
        block, rounding = INPUT_ROUNDINGS[kind]
        if x.shape[-1] % block:
            block, rounding = INPUT_ROUNDINGS[Q8_0]
        return rounding(x) if x.shape[-1] % block == 0 else x

    return streamed_logits(checkpoint.transformers_config(), CheckpointWeights(checkpoint), windows, device="cpu",
                           dtype=torch.float32, label=f"inputs rounded to {kind or 'nothing'}",
                           prepare=None if kind is None else prepare)


def mean_kld(reference: np.ndarray, other: np.ndarray) -> float:
    reference = torch.log_softmax(torch.from_numpy(reference).double(), -1)
    other = torch.log_softmax(torch.from_numpy(other).double(), -1)
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="real")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    for model in args.models.split(","):
        path = checkpoint_for(model)
        checkpoint = Checkpoint.open(path)
        ids = AutoTokenizer.from_pretrained(path).encode(heldout_text(), add_special_tokens=False)
        windows = np.array([ids[i * 256:(i + 1) * 256] for i in range(2)])
        clean = rounded_logits(checkpoint, windows, None)
        measured = Calibrations.outside_a_run(checkpoint).get(BUILTIN, {SENSITIVITY})
        row = {"model": model}
        for kind in INPUT_ROUNDINGS:
            row[f"{kind}_whole_model_kld"] = mean_kld(clean, rounded_logits(checkpoint, windows, kind))
            row[f"{kind}_calibrated_shares_sum"] = sum(measured.input_klds[kind].values())
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
