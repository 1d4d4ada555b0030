"""MLX mixtures of experts: mlx-lm's own layout and quantization (the very bytes of mlx_lm.convert), experts
converted a block at a time, dense layers between sparse ones, the routing traits mlx-lm cannot run refused,
and the experts mlx-lm chooses recorded for the router check."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import build_mlx, reference_choices_for, reference_logits_for
from families import FAMILY_CASES
from test_moe import TINY, copy_with, save_tiny, stacked_copy

from siliconvert.architectures import registry
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.mlx_arch import MLXArch
from siliconvert.errors import CheckpointError
from siliconvert.validate.metrics import compare
from siliconvert.validate.router import router_agreement
from siliconvert.validate.runners.mlx import MLXRunner

# gpt-oss's case is refused (its YaRN untruncated, as gpt-oss ships: mlx-lm always truncates); its MLX tests are below
# and, with siliconvert's own model file (`model_file: faithful`), in tests/test_mlx_models_gpt_oss.py
MOE_FAMILIES = [family for family, (_, config) in FAMILY_CASES.items()
                if "num_experts_per_tok" in config and family != "gpt_oss"]
# mlx_lm.convert reads these with a config patch; the hybrids' comparisons with it are in tests/test_mlx_hybrid.py
ATTENTION_MOE_FAMILIES = [family for family in MOE_FAMILIES if "layer_types" not in FAMILY_CASES[family][1]]
# The router rule mlx-lm's Qwen3-MoE file gives its quant predicate (Qwen3-Next's also for the shared expert's
# gate), for the files that have none (Mixtral's, OLMoE's, Qwen2-MoE's)
ROUTER_AT_8_BITS = {"group_size": 64, "bits": 8}
NEAR_TIE = 0.05  # logits: a greedy choice this close is decided by rounding


def arrays(folder: Path) -> dict[str, mx.array]:
    loaded = {}
    for shard in folder.glob("model*.safetensors"):
        loaded |= mx.load(str(shard))
    return loaded


def assert_same_arrays(mine: dict[str, mx.array], theirs: dict[str, mx.array]) -> None:
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert mine[name].dtype == theirs[name].dtype, name
        assert np.array_equal(np.array(mine[name].view(mx.uint8)), np.array(theirs[name].view(mx.uint8))), name


@pytest.mark.slow
@pytest.mark.parametrize("family", ATTENTION_MOE_FAMILIES)
def test_quantized_experts_are_mlx_lms_own(family, family_model, tmp_path):
    """The stream's expert stacks give the bytes mlx_lm.convert writes from the per-expert files, the routers (and
    the shared expert's gate) at 8 bits. mlx-lm needs a config it can read (Qwen3-MoE as transformers 5 saves it
    has no num_experts, and no family a top-level rope θ) and, for the files without a quant predicate, the 8-bit
    router rule of its Qwen3-MoE and Qwen3-Next files."""
    from mlx_lm.convert import convert
    from mlx_lm.utils import load

    source = family_model(family)
    readable = tmp_path / "source"
    shutil.copytree(source, readable)
    config = json.loads((readable / "config.json").read_text())
    config |= {"num_experts": config.get("num_experts") or config["num_local_experts"],
               "rope_theta": config["rope_parameters"]["rope_theta"]}
    (readable / "config.json").write_text(json.dumps(config))
    ours = build_mlx(source, tmp_path / "ours", bits=4, group_size=64, dtype="bfloat16").path  # mlx-lm's type
    model = load(str(readable), lazy=True)[0]
    # mlx-lm's own rule where its model file has one (Qwen3-MoE's), else the same rule for the routers
    predicate = None if hasattr(model, "quant_predicate") else (
        lambda path, _: ROUTER_AT_8_BITS if path.endswith((".gate", ".shared_expert_gate")) else True)
    convert(str(readable), str(tmp_path / "mlx_lm"), quantize=True, q_group_size=64, q_bits=4,
            quant_predicate=predicate)
    assert_same_arrays(arrays(ours), arrays(tmp_path / "mlx_lm"))
    quantization = json.loads((ours / "config.json").read_text())["quantization"]
    routers = {path: entry for path, entry in quantization.items() if isinstance(entry, dict)}
    spec = Checkpoint.open(source).spec
    gates = 2 if spec.experts.shared_intermediate_size else 1  # the router, the shared expert's gate
    assert len(routers) == gates * len(spec.sparse_layers) and all(entry["bits"] == 8 for entry in routers.values())


@pytest.mark.slow
def test_expert_blocks_and_shards_change_nothing_but_the_files(family_model, tmp_path, monkeypatch):
    """Expert stacks converted a few experts at a time, across shards: the arrays of the whole-tensor write."""
    import siliconvert.convert.mlx as convert_mlx

    source = family_model("qwen3_moe")
    whole = build_mlx(source, tmp_path / "whole").path
    monkeypatch.setattr(convert_mlx, "SHARD_BYTES", 64 << 10)
    monkeypatch.setattr(convert_mlx, "ROW_BLOCK_BYTES", 64 << 10)  # one expert's gate_up is 128 KiB of float32
    blocks = build_mlx(source, tmp_path / "blocks").path
    assert len(list(blocks.glob("model-*.safetensors"))) > 2
    assert_same_arrays(arrays(blocks), arrays(whole))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["per-expert files", "stacked files"])
def test_dense_layers_between_sparse_ones_and_unnormalised_routing(layout, tmp_path):
    """Qwen3-MoE with every second layer sparse, one of those listed MLP-only, the chosen experts' weights not
    renormalised: mlx-lm builds the same layers from config.json and computes the source's function (float16),
    choosing the reference's experts, in mlx and in the torch stand-in."""
    config = {"num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
              "intermediate_size": 48, "norm_topk_prob": False, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    source = save_tiny(tmp_path / "per-expert", "qwen3_moe", **config)
    if layout == "stacked files":
        source = stacked_copy(source, tmp_path / "stacked")
    assert Checkpoint.open(source).spec.sparse_layers == [1]
    artifact = build_mlx(source, tmp_path / "mlx", bits=16).path
    written = json.loads((artifact / "config.json").read_text())
    assert (written["decoder_sparse_step"], written["mlp_only_layers"]) == (1, [0, 2, 3])
    assert written["norm_topk_prob"] is False
    assert_computes_the_source_function(source, artifact)


def assert_computes_the_source_function(source: Path, artifact: Path) -> None:
    """The folder, run by mlx-lm and by the torch stand-in, gives transformers' logits and chooses its experts."""
    windows = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 24))
    reference = reference_logits_for(source, windows)
    expected = reference_choices_for(source, windows)
    for engine in ("mlx", "torch"):
        runner = MLXRunner(artifact, {"engine": engine})
        logits = runner.logits_many(windows)
        scores, _ = compare(reference.reshape(-1, reference.shape[-1]), logits.reshape(-1, logits.shape[-1]),
                            windows.reshape(-1))
        assert scores.mean_kld < 1e-3, (engine, scores)
        agreement = router_agreement(expected, runner.expert_choices(), Checkpoint.open(source).spec.sparse_layers)
        assert agreement["same_experts"] >= 0.95, (engine, agreement)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_a_stored_tied_head_and_stacked_files(family, tmp_path):
    """OLMoE with tied embeddings whose file stores the head anyway (mlx-lm's OLMoE sanitize keeps it: its load
    would refuse the folder), and Qwen2-MoE in transformers' stacked layout, its shared expert beside the stacks:
    both compute the source's function (float16), choosing the reference's experts."""
    if family == "olmoe":
        tied = save_tiny(tmp_path / "tied", "olmoe", num_experts=4, num_experts_per_tok=2, intermediate_size=16,
                         tie_word_embeddings=True)
        source = copy_with(tied, tmp_path / "head stored", lambda weights: weights.__setitem__(
            "lm_head.weight", weights["model.embed_tokens.weight"].clone()))
    else:
        per_expert = save_tiny(tmp_path / "per-expert", "qwen2_moe", num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=16, shared_expert_intermediate_size=24, intermediate_size=48)
        source = stacked_copy(per_expert, tmp_path / "stacked")
    assert_computes_the_source_function(source, build_mlx(source, tmp_path / "mlx", bits=16).path)


SIZES = {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


def moe_spec(family: str, **config):
    """The spec of a FAMILY_CASES configuration, edited by `config`."""
    config = SIZES | FAMILY_CASES[family][1] | {"architectures": [ARCHITECTURES[family]]} | config
    return registry.for_config(config).spec(config)


@pytest.mark.parametrize(("family", "config", "edit", "trait"), [
    ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                       "original_max_position_embeddings": 256}}, {}, "rope_scaling"),
    # traits no Mixtral config can state, which mlx-lm's Mixtral file could not run
    ("mixtral", {}, {"layers": "first dense"}, "dense_layers"),
    ("mixtral", {}, {"experts": "unnormalised"}, "normalize_topk"),
    # mlx-lm's Qwen2-MoE file: every layer sparse, weights never renormalised, its own head, no sliding window
    ("qwen2_moe", {"mlp_only_layers": [1]}, {}, "dense_layers"),
    ("qwen2_moe", {"norm_topk_prob": True}, {}, "normalize_topk"),
    ("qwen2_moe", {"tie_word_embeddings": True}, {}, "tie_word_embeddings"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}, {}, "sliding_window"),
    ("qwen2_moe", {"num_experts": 0}, {}, "experts"),
    ("olmoe", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, {}, "rope_scaling"),
    ("qwen3_moe", {}, {"experts": "shared"}, "shared_expert"),
])
def test_refusals_name_the_trait(family, config, edit, trait):
    spec = moe_spec(family, **config)
    if edit.get("layers") == "first dense":
        edit = {"layers": (dataclasses.replace(spec.layers[0], sparse=False), *spec.layers[1:])}
    if edit.get("experts") == "unnormalised":
        edit = {"experts": dataclasses.replace(spec.experts, normalize_topk=False)}
    if edit.get("experts") == "shared":
        edit = {"experts": dataclasses.replace(spec.experts, shared_intermediate_size=64)}
    with pytest.raises(CheckpointError, match=f"cannot honour the trait {trait}"):
        MLXArch(dataclasses.replace(spec, **edit), "config.json")


def test_mlx_lm_reads_the_experts_from_config():
    """What mlx-lm's model files need, whatever the source config spells: Qwen3-MoE's expert count as
    num_experts (transformers 5 saves num_local_experts), Mixtral's head size as hidden / heads, Qwen2-MoE's
    shared expert (and no norm_topk_prob, which its file never reads), OLMoE's experts' size as intermediate_size."""
    qwen = MLXArch(moe_spec("qwen3_moe", mlp_only_layers=[1]), "config.json").config()
    expected = {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [1]}
    assert {key: qwen[key] for key in expected} == expected
    mixtral = MLXArch(moe_spec("mixtral"), "config.json").config()
    assert (mixtral["num_local_experts"], mixtral["intermediate_size"]) == (4, 128)
    with pytest.raises(CheckpointError, match="cannot honour the trait head_dim"):
        MLXArch(moe_spec("mixtral", head_dim=64), "config.json")
    qwen2 = MLXArch(moe_spec("qwen2_moe"), "config.json").config()
    assert (qwen2["moe_intermediate_size"], qwen2["shared_expert_intermediate_size"]) == (128, 192)
    assert "norm_topk_prob" not in qwen2
    olmoe = MLXArch(moe_spec("olmoe", norm_topk_prob=True), "config.json").config()
    assert (olmoe["num_experts"], olmoe["intermediate_size"], olmoe["norm_topk_prob"]) == (4, 128, True)


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mlx_lm_loads_and_generates_what_transformers_generates(family, family_model, tmp_path):
    """mlx_lm.load opens the folder unchanged and mlx-lm's greedy generation (through its KV cache or state)
    continues a prompt as transformers' does; where the two part, transformers' own top two logits were within
    NEAR_TIE (8-bit weights' noise may pick either: Qwen3-Next's test checkpoint has such a step second).
    At 8 bits: mlx's CPU runs unquantized experts in float32 only."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = family_model(family)
    model, tokenizer = load(str(build_mlx(source, tmp_path, bits=8).path))
    prompt = AutoTokenizer.from_pretrained(source).encode("def parse(text):\n    return", add_special_tokens=False)
    assert tokenizer.encode("def parse(text):\n    return", add_special_tokens=False) == prompt
    ours = [int(token) for token, _ in generate_step(mx.array(prompt), model, max_tokens=8)]
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                output_scores=True, return_dict_in_generate=True)
    expected = theirs.sequences[0, len(prompt):].tolist()
    parted = next((i for i, (mine, its) in enumerate(zip(ours, expected, strict=True)) if mine != its), None)
    if parted is not None:  # where the two part, transformers' own choice was a near tie
        margin = float(theirs.scores[parted][0].topk(2).values.diff().abs())
        assert margin < NEAR_TIE, (parted, margin, ours, expected)


@pytest.mark.slow
def test_gpt_oss_keeps_its_mxfp4_experts_exact_in_mlx(tmp_path):
    """gpt-oss with MXFP4 experts (YaRN truncated, which mlx-lm computes): the 4-bit folder keeps each expert stack in
    mlx's mxfp4 mode, every value the source's own, the rest affine 4-bit, the routers at 8 bits; mlx-lm runs it
    within the MLX limit, its routers choosing transformers' experts. As gpt-oss ships it (untruncated), it is
    refused naming the trait."""
    import json
    import shutil

    from families import gpt_oss_mxfp4
    from test_mlx import held_out_windows

    untruncated = gpt_oss_mxfp4(tmp_path / "mxfp4")
    with pytest.raises(CheckpointError, match="cannot honour the trait rope_scaling: mlx-lm always truncates"):
        build_mlx(untruncated, tmp_path / "refused", bits=4)
    source = tmp_path / "truncated"
    shutil.copytree(untruncated, source)
    config = json.loads((source / "config.json").read_text())
    config["rope_parameters"]["truncate"] = True
    (source / "config.json").write_text(json.dumps(config))
    folder = build_mlx(source, tmp_path / "mlx", bits=4, group_size=64).path
    quantization = json.loads((folder / "config.json").read_text())["quantization"]
    stream = {info.name: array for info, array in Checkpoint.open(source).tensors()}
    loaded = arrays(folder)
    for layer in (0, 1):
        experts = f"model.layers.{layer}.mlp.experts"
        assert quantization[f"model.layers.{layer}.mlp.router"] == ROUTER_AT_8_BITS | {"mode": "affine"}
        expected = {"gate_proj": stream[f"{experts}.gate_up_proj"][:, :96],
                    "up_proj": stream[f"{experts}.gate_up_proj"][:, 96:], "down_proj": stream[f"{experts}.down_proj"]}
        for projection, values in expected.items():
            assert quantization[f"{experts}.{projection}"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
            packed, scales = (loaded[f"{experts}.{projection}.{part}"] for part in ("weight", "scales"))
            dequantized = mx.dequantize(packed, scales, None, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
            assert np.array_equal(np.array(dequantized), values), projection
    windows = held_out_windows(source)
    reference = reference_logits_for(source, windows)
    runner = MLXRunner(folder, {})
    logits = runner.logits_many(windows)
    vocab = reference.shape[-1]
    scores, _ = compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                        windows[:, 1:].reshape(-1))
    assert scores.mean_kld <= 0.06
    agreement = router_agreement(reference_choices_for(source, windows), runner.expert_choices(), [0, 1])
    assert agreement["same_experts"] >= 0.9, agreement
