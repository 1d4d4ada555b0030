"""How much an expert stack's quantization error costs at the output, against the estimate's role gains (#17).

On a trained MoE test checkpoint (tests/families.py), GGUF files are planned with every planned tensor at Q8_0 but
one role group (the expert stacks, attention, a shared expert) at a lower type, as ROLE_GAINS were measured on the
demo model (quantize/sensitivity.py). Each group's ΔKLD (llama.cpp against transformers, over the all-Q8_0 file)
is divided by its predicted Δ (Σ gain · relative error from the plan's own costs): where the ratio of the expert
stacks matches the other groups', the dense feed-forward's gain fits the stacks.

    .venv/bin/python -m bench.moe_gains [--only qwen3_moe,mixtral] [--low Q4_0] [--windows 8]

Prints one line per family and group.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

GROUPS = {"expert stacks": ("_exps.",), "attention": ("attn_",), "shared expert": ("_shexp.",)}
LENGTH = 128


def measure(family: str, low: str, windows: int) -> dict[str, tuple[float, float]]:
    """group → (measured ΔKLD, predicted Δ) for `family`'s test checkpoint, the group at `low`, the rest at Q8_0."""
    from transformers import AutoTokenizer

    import siliconvert.convert.gguf as convert_gguf
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.demo import small_checkpoint
    from siliconvert.quantize.plan import Plan
    from siliconvert.recipe import GGUFTarget
    from siliconvert.textdata import heldout_text
    from tests.conftest import reference_logits_for
    from tests.families import FAMILY_CASES
    from tests.test_plan_models import gguf_logits, mean_kld, write

    tokenizer, config = FAMILY_CASES[family]
    source = small_checkpoint(None, family, tokenizer, config=config)
    checkpoint = Checkpoint.open(source)
    ids = AutoTokenizer.from_pretrained(source).encode(heldout_text(), add_special_tokens=False)
    tokens = np.array([ids[i * LENGTH:(i + 1) * LENGTH] for i in range(windows)])
    reference = reference_logits_for(source, tokens)
    predicted: dict[str, float] = {}

    def planner(group: str | None):
        def make_plan(costs, goal, *, fixed_bytes=0):
            choices, predicted[group] = {}, 0.0
            for cost in costs:
                options = {o.kind: o for o in cost.options}
                lowered = group is not None and any(part in cost.name for part in GROUPS[group])
                choices[cost.name] = options[low if lowered else "Q8_0"]
                predicted[group] += options[low].error - options["Q8_0"].error if lowered else 0.0
            return Plan(choices, sum(c.params for c in costs), fixed_bytes, 1.0, {"max_mean_kld": 1.0})
        return make_plan

    klds: dict[str | None, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for group in (None, *GROUPS):
            target = GGUFTarget(format="gguf", quants=["auto"], plan={"max_mean_kld": 1.0})
            with mock.patch.object(convert_gguf, "make_plan", planner(group)):
                [artifact] = write(convert_gguf.GGUFWriter(checkpoint, target, Path(scratch) / str(group), "m"))
            if group is None or predicted[group] > 0:  # a family without the group has nothing lowered
                klds[group] = mean_kld(reference, gguf_logits(artifact.path, tokens), tokens)
    return {group: (klds[group] - klds[None], predicted[group]) for group in GROUPS if group in klds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="qwen3_moe,mixtral,qwen2_moe,olmoe")
    parser.add_argument("--low", default="Q4_0", help="the lowered group's llama.cpp type (a 32-block type fits)")
    parser.add_argument("--windows", type=int, default=8, help=f"held-out windows of {LENGTH} tokens")
    args = parser.parse_args()
    for family in args.only.split(","):
        for group, (measured, predicted) in measure(family, args.low, args.windows).items():
            print(f"{family} {args.low} {group}: ΔKLD {measured:.3g}, predicted {predicted:.3g}, "
                  f"measured/predicted {measured / predicted:.2f}", flush=True)


if __name__ == "__main__":
    main()
