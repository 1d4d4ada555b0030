"""Plans on mixtures of experts: an expert stack's costs are its experts quantized one by one, each with its own
importance row and weighed by the tokens routed to it; planned GGUF and MLX models keep to a size goal, open
unchanged in llama.cpp and mlx_lm.load and beat the fixed recipe of that size (Mixtral, Qwen2-MoE, OLMoE); quality
goals are met by the project's own validation, router agreement reported (Qwen3-MoE, through `siliconvert recipe`)."""

from __future__ import annotations

import json
import subprocess

import gguf
import mlx.core as mx
import numpy as np
import pytest
import yaml
from conftest import SILICONVERT
from families import FAMILY_CASES
from gguf import GGMLQuantizationType as QType

from siliconvert.checkpoint import Checkpoint
from siliconvert.quantize.gguf import TensorQuantizer
from siliconvert.quantize.sensitivity import (
    MLX_MODE_CANDIDATES,
    gguf_costs,
    gguf_kinds,
    mlx_costs,
    mlx_kinds,
    mlx_option,
    mlx_option_name,
    relative_error,
)

MOE_FAMILIES = [family for family, (_, config) in FAMILY_CASES.items() if "num_experts_per_tok" in config]
ROUTED = np.array([5.0, 0.0, 15.0])  # calibration tokens per expert: the second expert was never chosen


@pytest.fixture(scope="module")
def stack() -> tuple[np.ndarray, np.ndarray]:
    """The gate half of a gate_up stack of 3 experts (a view that skips the up rows, as the writers pass it) and
    an importance row per expert; the unrouted expert is all zeros (no error), so weighing matters."""
    rng = np.random.default_rng(0)
    gate_up = rng.standard_normal((3, 32, 256)).astype(np.float32)
    gate_up[1] = 0
    return gate_up[:, :16], rng.uniform(0.1, 2.0, (3, 256)).astype(np.float32)


def weighted(errors: list[float], routed: np.ndarray) -> float:
    return float(np.dot(errors, routed) / routed.sum())


def test_gguf_stack_costs_are_each_experts_quantization_weighed_by_its_tokens(stack):
    gate, importance = stack
    quantizer = TensorQuantizer(threads=1)
    try:
        costs = gguf_costs("blk.0.ffn_gate_exps.weight", gate, importance, quantizer, gain=2.0,
                           candidates=(QType.Q2_K, QType.Q4_0, QType.Q4_K, QType.Q8_0), routed_tokens=ROUTED)
        uniform = gguf_costs("blk.0.ffn_gate_exps.weight", gate, importance, quantizer, candidates=(QType.Q4_K,))
        for option in costs.options:
            qtype = QType[option.kind]
            alone = [quantizer.submit(np.ascontiguousarray(gate[e]), qtype, importance[e]).result() for e in range(3)]
            errors = [relative_error(gate[e], gguf.quants.dequantize(alone[e], qtype), importance[e])
                      for e in range(3)]
            assert option.nbytes == sum(a.nbytes for a in alone), option.kind
            assert option.error == pytest.approx(2.0 * weighted(errors, ROUTED), rel=1e-9), option.kind
            assert weighted(errors, ROUTED) != pytest.approx(np.mean(errors), rel=0.1)  # the weights matter here
            if qtype == QType.Q4_K:  # no routing counts: the experts alike
                assert uniform.options[0].error == pytest.approx(np.mean(errors), rel=1e-9)
    finally:
        quantizer.close()
    assert costs.params == gate.size


def test_mlx_stack_costs_are_each_experts_quantization_weighed_by_its_tokens(stack):
    gate, importance = stack
    costs = mlx_costs("model.layers.0.mlp.switch_mlp.gate_proj", gate, importance, scale_bytes=2,
                      candidates=((3, 32), (4, 64), (8, 128)), routed_tokens=ROUTED)
    assert {option.kind for option in costs.options} >= set(MLX_MODE_CANDIDATES)  # the float modes too
    for option in costs.options:
        bits, group, mode = mlx_option(option.kind)
        errors, nbytes = [], 0
        for e in range(3):
            packed, scales, *biases = mx.quantize(mx.array(np.ascontiguousarray(gate[e])), group, bits, mode=mode)
            # affine: a scale and a bias per group in the float type; a float mode: one 8-bit scale, no bias
            nbytes += packed.nbytes + (2 * 2 * scales.size if mode == "affine" else scales.size)
            dequantized = mx.dequantize(packed, scales, biases[0] if biases else None, group, bits, mode=mode)
            errors.append(relative_error(gate[e], np.asarray(dequantized.astype(mx.float32)), importance[e]))
        assert option.nbytes == nbytes, option.kind
        assert option.error == pytest.approx(weighted(errors, ROUTED), rel=1e-6), option.kind
    assert costs.params == gate.size


# ---- on trained checkpoints ------------------------------------------------------------------------------

WINDOWS, LENGTH = 2, 128


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f != "qwen3_moe"])  # its quality plans: below
def test_plans_at_the_fixed_recipes_sizes_keep_to_them_and_beat_them(family, tmp_path):
    """At the bytes of Q4_K_M and of MLX 4-bit g64, the planned GGUF and MLX models are no larger, hold the plan's
    types (expert stacks among the planned tensors, routers never), open in llama.cpp and mlx_lm.load, and
    score a lower mean KLD than the fixed recipe."""
    from conftest import build_mlx, reference_logits_for
    from families import FAMILY_CASES, LLAMA_CPP_SHAPES, TRUNCATED_YARN
    from mlx_lm import load
    from test_plan_models import gguf_logits, mean_kld, mlx_logits, write
    from transformers import AutoTokenizer

    from siliconvert.convert.gguf import GGUFWriter
    from siliconvert.demo import small_checkpoint
    from siliconvert.recipe import GGUFTarget
    from siliconvert.textdata import heldout_text

    tokenizer, config = FAMILY_CASES[family]  # in the shapes llama.cpp's graph runs (its own are refused by trait)
    shapes = LLAMA_CPP_SHAPES.get(family, {}) | TRUNCATED_YARN.get(family, {})
    source = small_checkpoint(None, family, tokenizer, config=config | shapes)
    checkpoint = Checkpoint.open(source)
    ids = AutoTokenizer.from_pretrained(source).encode(heldout_text(), add_special_tokens=False)
    windows = np.array([ids[i * LENGTH:(i + 1) * LENGTH] for i in range(WINDOWS)])
    reference = reference_logits_for(source, windows)

    [fixed] = write(GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["Q4_K_M"], imatrix="builtin"),
                               tmp_path, "m"))
    size = fixed.path.stat().st_size
    [planned] = write(GGUFWriter(checkpoint, GGUFTarget(format="gguf", quants=["auto"], plan={"size_mb": size / 1e6}),
                                 tmp_path, "m"))
    assert planned.path.stat().st_size <= size
    kinds = gguf_kinds(planned.path)
    assert {name: kinds[name] for name in planned.plan["tensors"]} == planned.plan["tensors"]
    assert {f"blk.0.ffn_{part}_exps.weight" for part in ("gate", "up", "down")} <= planned.plan["tensors"].keys()
    routers = [name for name in kinds if "ffn_gate_inp" in name]  # a shared expert's gate too: F32, not planned
    assert routers and all(kinds[name] == "F32" and name not in planned.plan["tensors"] for name in routers)
    if checkpoint.spec.experts.shared_intermediate_size:  # the shared expert is planned as the dense MLP it is
        assert {f"blk.0.ffn_{part}_shexp.weight" for part in ("gate", "up", "down")} <= planned.plan["tensors"].keys()
    assert (mean_kld(reference, gguf_logits(planned.path, windows), windows)
            < mean_kld(reference, gguf_logits(fixed.path, windows), windows))

    four_bit = build_mlx(source, tmp_path / "fixed", bits=4, group_size=64)
    size = sum(f.stat().st_size for f in four_bit.path.iterdir())
    planned = build_mlx(source, tmp_path / "planned", bits="auto", plan={"size_mb": size / 1e6})
    assert sum(f.stat().st_size for f in planned.path.iterdir()) <= size
    assert mlx_kinds(planned.path).items() >= planned.plan["tensors"].items()
    assert any(".switch_mlp." in module or ".mlp.experts." in module  # gpt-oss's SwitchGLU is mlp.experts
               for module in planned.plan["tensors"])
    model, _ = load(str(planned.path))  # mlx_lm.load reads each module's entry: its SwitchLinear at its width
    modules = dict(model.named_modules())
    assert {path: mlx_option_name(modules[path].bits, modules[path].group_size, modules[path].mode)
            for path in planned.plan["tensors"]} == planned.plan["tensors"]
    quantization = json.loads((planned.path / "config.json").read_text())["quantization"]
    # the routers (Granite 4.0-H's as mlx-lm names it, router.layer) and the shared experts' gates
    routers = [entry for path, entry in quantization.items() if path.endswith(("gate", "router.layer", "mlp.router"))]
    assert routers and all(entry["bits"] == 8 for entry in routers)  # not planned: mlx-lm's 8 bits
    assert (mean_kld(reference, mlx_logits(planned.path, windows), windows)
            < mean_kld(reference, mlx_logits(four_bit.path, windows), windows))


@pytest.mark.slow
def test_quality_plans_meet_their_target_in_the_projects_validation(family_model, tmp_path):
    """`siliconvert recipe` with planned GGUF and MLX targets on a mixture of experts: both pass their
    max_mean_kld as validation measures it, and the report gives their router agreement."""
    goals = {"gguf": 0.002, "mlx": 0.01}
    recipe = {"source": str(family_model("qwen3_moe")), "output": str(tmp_path / "out"),
              "targets": [{"format": "gguf", "quants": ["auto"], "plan": {"max_mean_kld": goals["gguf"]}},
                          {"format": "mlx", "bits": "auto", "plan": {"max_mean_kld": goals["mlx"]}}],
              "validate": {"tokens": 256, "context": 128, "prefill_tokens": 16, "decode_tokens": 4,
                           "gates": {"min_router_agreement": 0.9}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([SILICONVERT, "recipe", str(tmp_path / "recipe.yaml")],
                            capture_output=True, text=True, env={**__import__("os").environ, "SILICONVERT_QUIET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for artifact in report["artifacts"]:
        assert artifact["metrics"]["mean_kld"] <= goals[artifact["format"]], artifact["quant"]
        assert artifact["router_agreement"]["measured"] and artifact["router_agreement"]["same_experts"] >= 0.9
        assert any("exps" in name or ".switch_mlp." in name for name in artifact["plan"]["tensors"])
