"""Core ML on mixtures of experts, beyond what the family checkpoints (tests/families.py) show: dense layers
between sparse ones with the chosen weights not renormalised, against transformers; and the compressed variants
of a trained MoE checkpoint, whose routers stay fp16."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from families import FAMILY_CASES
from test_coreml import windows_of

from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter
from siliconvert.recipe import CoreMLTarget
from siliconvert.validate.metrics import compare
from siliconvert.validate.router import RouterRecorder, router_agreement
from siliconvert.validate.runners.coreml import CoreMLRunner
from siliconvert.validate.runners.mil import MILProgram

pytestmark = pytest.mark.slow

VOCAB, CONTEXT = 96, 32


def build(source: Path, out_dir: Path, **target) -> list:
    checkpoint = Checkpoint.open(source)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT, **target), out_dir, "moe")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    return writer.finish()


def reference_of(source: Path, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' float32 logits and the experts its routers chose, per window."""
    from transformers import AutoModelForCausalLM

    spec = Checkpoint.open(source).spec
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    recorder = RouterRecorder(spec.sparse_layers, spec.experts.used)
    recorder.attach(model)
    with torch.inference_mode():
        logits = np.stack([model(torch.as_tensor(window[None])).logits[0].numpy() for window in windows])
    return logits, recorder.choices(*windows.shape)


def scored(artifact, windows: np.ndarray, reference: np.ndarray, choices: np.ndarray, sparse_layers: list[int]):
    runner = CoreMLRunner(artifact.path, artifact.runner_options)
    logits = runner.logits_many(windows)
    vocab = reference.shape[-1]
    scores = compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                     windows[:, 1:].reshape(-1))[0]
    return logits, scores, router_agreement(choices, runner.expert_choices(), sparse_layers)


@pytest.fixture(scope="module")
def mixed_moe(tmp_path_factory) -> Path:
    """A random Qwen3-MoE (bf16, word-level tokenizer) whose middle layer keeps a dense MLP and whose chosen
    weights are not renormalised; weights large enough (initializer_range) that its logits are far from flat."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                            max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.1)
    folder = tmp_path_factory.mktemp("mixed-moe")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # the calibration text: a word per token
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def test_dense_layers_between_sparse_ones_and_weights_not_renormalised(mixed_moe, tmp_path):
    spec = Checkpoint.open(mixed_moe).spec
    assert spec.sparse_layers == [0, 2] and not spec.experts.normalize_topk
    (artifact,) = build(mixed_moe, tmp_path, chunks=2)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert [chunk["sparse_layers"] for chunk in manifest["chunks"]] == [[0], [2]]
    windows = np.random.default_rng(0).integers(0, VOCAB, (2, CONTEXT))
    reference, choices = reference_of(mixed_moe, windows)
    logits, scores, agreement = scored(artifact, windows, reference, choices, spec.sparse_layers)
    assert agreement["same_experts"] >= 0.95, agreement
    assert scores.mean_kld < 0.002 and scores.same_top1 >= 0.95, scores
    # not a flat distribution that any program would match: renormalising the chosen weights changes it
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(logits, reference, atol=0.02)


PLANNED_KLD = 0.002  # predicted: between this model's int8 and int4 packages


def test_compressed_variants_keep_the_routers_fp16(small_model, tmp_path):
    """int8, int4 and a planned package (each expert's weights planned apart, weighed by its routed tokens): the
    routers stay fp16 in all three, and each scores within its bound with the reference's experts mostly chosen."""
    tokenizer, config = FAMILY_CASES["qwen3_moe"]
    source = small_model("qwen3_moe", tokenizer, config=config)
    spec = Checkpoint.open(source).spec
    artifacts = build(source, tmp_path, precision=["int8", "int4", "auto"], plan={"max_mean_kld": PLANNED_KLD})
    assert [a.quant for a in artifacts] == ["fp16", "int8", "int4", f"auto-kld{PLANNED_KLD:g}"]
    plan = artifacts[-1].plan["tensors"]
    assert not [name for name in plan if "router" in name or "gate_inp" in name]
    experts = [name for name in plan if "_exp[" in name]  # each expert's gate, up and down, planned apart
    assert len(experts) == 3 * spec.experts.count * len(spec.sparse_layers), plan
    assert len(set(plan.values())) > 1, plan
    windows = windows_of(source, count=2, length=CONTEXT)
    reference, choices = reference_of(source, windows)
    results = {a.quant: scored(a, windows, reference, choices, spec.sparse_layers)[1:] for a in artifacts}
    routers = [f"l{layer}_router" for layer in spec.sparse_layers]
    for artifact in artifacts[1:]:
        decode = MILProgram(artifact.path / "chunk_01.mlpackage").functions["decode"]
        # a weight's key: a blob's offset (stored fp16), or the load-time op that dequantizes it
        stored = {step.name: isinstance(decode.weights[step.inputs["weight"][0]], int)
                  for step in decode.steps if step.op_type == "conv"}
        fp16 = [name for name, fp16 in stored.items() if fp16]
        assert set(routers) <= set(fp16) and (artifact.plan or fp16 == routers), (artifact.quant, fp16)
    (int8_scores, int8_router), (int4_scores, int4_router) = results["int8"], results["int4"]
    assert int8_scores.mean_kld < 1e-3 and int8_router["same_experts"] >= 0.95, results["int8"]
    assert int8_scores.mean_kld < int4_scores.mean_kld < 0.05 and int4_router["same_experts"] >= 0.85, results["int4"]
    planned_scores, planned_router = results[artifacts[-1].quant]
    # the writer alone (no re-plan loop here) is held to better than int4, in fewer bytes than int8
    assert planned_scores.mean_kld < int4_scores.mean_kld and planned_router["same_experts"] >= 0.9, results
    sizes = {a.quant: sum(f.stat().st_size for f in a.path.rglob("*") if f.is_file()) for a in artifacts}
    assert sizes[artifacts[-1].quant] < sizes["int8"], sizes
