"""Mixtures of experts: the description, both file layouts of the experts, and the reference's router choices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SILICONVERT
from safetensors.torch import load_file, save_file

from siliconvert.architectures import registry
from siliconvert.checkpoint import Checkpoint
from siliconvert.errors import CheckpointError
from siliconvert.validate.router import RouterRecorder

TINY = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128, "tie_word_embeddings": False}


def save_tiny(folder: Path, model_type: str, **config) -> Path:
    """A random-weight MoE checkpoint saved by transformers (whichever expert layout it writes) + a tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(TINY | config)))
    model.to(torch.bfloat16).save_pretrained(folder)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0")).save(str(folder / "tokenizer.json"))
    return folder


QWEN3_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "intermediate_size": 48,
             "norm_topk_prob": False, "mlp_only_layers": [1]}
MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16}


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("qwen3-moe"), "qwen3_moe", **QWEN3_MOE)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("mixtral"), "mixtral", **MIXTRAL)


def test_qwen3_moe_traits_say_which_layers_are_sparse() -> None:
    family = registry.for_config({"architectures": ["Qwen3MoeForCausalLM"]})
    config = {"model_type": "qwen3_moe", **TINY, **QWEN3_MOE, "num_hidden_layers": 4, "decoder_sparse_step": 2,
              "mlp_only_layers": [3]}
    spec = family.spec(config)
    # sparse where (i + 1) % step == 0 and i is not MLP-only: layer 1 only (layer 3 is listed MLP-only)
    assert spec.sparse_layers == [1]
    assert spec.experts.count == 4 and spec.experts.used == 2 and spec.experts.intermediate_size == 16
    assert spec.experts.normalize_topk is False
    assert spec.traits()["experts"] == "2 of 4" and spec.traits()["dense_layers"] == [0, 2, 3]


def test_mixtral_is_sparse_everywhere_and_renormalises() -> None:
    family = registry.for_config({"architectures": ["MixtralForCausalLM"]})
    spec = family.spec({"model_type": "mixtral", **TINY, **MIXTRAL})
    assert spec.sparse_layers == [0, 1, 2] and spec.experts.normalize_topk
    assert "dense_layers" not in spec.traits()


def test_more_experts_per_token_than_experts_is_refused() -> None:
    family = registry.for_config({"architectures": ["MixtralForCausalLM"]})
    with pytest.raises(CheckpointError, match="5 experts per token, but 4 experts"):
        family.spec({"model_type": "mixtral", **TINY, **MIXTRAL, "num_experts_per_tok": 5})


def stream(folder: Path) -> dict[str, np.ndarray]:
    return {info.name: array for info, array in Checkpoint.open(folder).tensors()}


def stacked_copy(source: Path, out: Path) -> Path:
    """The same weights in transformers' own layout: loaded by transformers (which stacks the experts and renames
    Mixtral's modules) and written as its state dict, as a transformers-5 checkpoint without the reverse
    conversion holds them."""
    from transformers import AutoModelForCausalLM

    out.mkdir()
    state = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).state_dict()
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    for file in ("config.json", "tokenizer.json"):
        (out / file).write_text((source / file).read_text())
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_expert_and_stacked_files_stream_what_transformers_loads(family: str, qwen3_moe: Path, mixtral: Path,
                                                                     tmp_path: Path) -> None:
    per_expert_files = qwen3_moe if family == "qwen3_moe" else mixtral  # transformers saves the hub's layout
    assert any(".experts.0." in name for name in load_file(per_expert_files / "model.safetensors"))
    stacked_files = stacked_copy(per_expert_files, tmp_path / "stacked")
    per_expert, stacked = stream(per_expert_files), stream(stacked_files)
    assert sorted(per_expert) == sorted(stacked)  # the same names: transformers' own
    layers = [int(name.split(".")[2]) for name in per_expert if name.startswith("model.layers.")]
    assert layers == sorted(layers)  # streamed layer by layer
    loaded = load_file(stacked_files / "model.safetensors")
    for name, array in per_expert.items():
        np.testing.assert_array_equal(array, stacked[name], err_msg=name)
        np.testing.assert_array_equal(array, loaded[name].float().numpy(), err_msg=name)
    sparse = Checkpoint.open(per_expert_files).spec.sparse_layers
    assert f"model.layers.{sparse[0]}.mlp.experts.gate_up_proj" in per_expert


def test_both_layouts_at_once_are_refused(qwen3_moe: Path, tmp_path: Path) -> None:
    both = stacked_copy(qwen3_moe, tmp_path / "both")
    weights = load_file(both / "model.safetensors") | {
        "model.layers.0.mlp.experts.0.down_proj.weight": load_file(qwen3_moe / "model.safetensors")[
            "model.layers.0.mlp.experts.0.down_proj.weight"]}
    save_file(weights, both / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.down_proj' is stored both stacked and per"):
        Checkpoint.open(both)


def copy_with(source: Path, out: Path, edit) -> Path:
    out.mkdir()
    weights = load_file(source / "model.safetensors")
    edit(weights)
    save_file(weights, out / "model.safetensors")
    for file in ("config.json", "tokenizer.json"):
        (out / file).write_text((source / file).read_text())
    return out


def test_a_missing_expert_is_named(qwen3_moe: Path, tmp_path: Path) -> None:
    damaged = copy_with(qwen3_moe, tmp_path / "damaged",
                        lambda weights: weights.pop("model.layers.0.mlp.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.0.mlp.experts.2.up_proj.weight'"):
        Checkpoint.open(damaged)


def test_too_few_experts_for_the_config_is_refused(mixtral: Path, tmp_path: Path) -> None:
    def drop_expert_3(weights: dict) -> None:
        for name in [n for n in weights if ".experts.3." in n]:
            del weights[name]

    damaged = copy_with(mixtral, tmp_path / "damaged", drop_expert_3)
    with pytest.raises(CheckpointError, match=r"gate_up_proj' has shape \[3, 32, 32\], config.json implies \[4, 32"):
        Checkpoint.open(damaged)


def test_reference_records_the_experts_transformers_chooses(qwen3_moe: Path) -> None:
    from transformers import AutoModelForCausalLM

    from siliconvert.streamed import CheckpointWeights, streamed_logits

    checkpoint = Checkpoint.open(qwen3_moe)
    spec = checkpoint.spec
    windows = np.random.default_rng(0).integers(0, 96, size=(2, 12))
    recorder = RouterRecorder(spec.sparse_layers, spec.experts.used)
    streamed_logits(checkpoint.transformers_config(), CheckpointWeights(checkpoint), windows, device="cpu",
                    dtype=torch.float32, label="test", prepare=recorder.attach, keep_logits=False)
    choices = recorder.choices(*windows.shape)
    assert choices.shape == (2, 12, len(spec.sparse_layers), 2)
    # the whole model's router logits, as transformers returns them: their top 2 are the chosen experts
    model = AutoModelForCausalLM.from_pretrained(qwen3_moe, dtype=torch.float32)
    for row, window in enumerate(windows):
        out = model(torch.as_tensor(window[None]), output_router_logits=True)
        expected = np.stack([logits.topk(2, dim=-1).indices.numpy() for logits in out.router_logits], axis=1)
        np.testing.assert_array_equal(np.sort(choices[row], -1), np.sort(expected, -1))


def test_in_the_calibrations_pass_the_experts_chosen_and_routed_are_those_of_separate_passes(qwen3_moe: Path,
                                                                                          tmp_path: Path) -> None:
    """The reference's routers and the calibration's per-expert importance in one pass: each as in a pass of its own."""
    import hashlib

    from siliconvert.calibration import _forward
    from siliconvert.corpus import Windows
    from siliconvert.validate.reference import _child, reference_forward

    checkpoint = Checkpoint.open(qwen3_moe)
    rng = np.random.default_rng(0)
    importance_windows, tokens = rng.integers(0, 96, size=(2, 24)), rng.integers(0, 96, size=(2, 12))
    windows = Windows(tokens, "test", hashlib.sha256(tokens.tobytes()).hexdigest()[:16], "")
    alone = _forward(checkpoint, "test", None, importance_windows)  # the child processes' functions, run here
    _child(checkpoint, tokens, tmp_path / "alone")
    shared = _forward(checkpoint, "test", None, importance_windows,
                      alongside=reference_forward(checkpoint, windows, tmp_path / "shared"))
    (folder,) = (tmp_path / "shared").iterdir()
    for file in ("router.npy", "logits.npy"):
        assert np.array_equal(np.load(folder / file), np.load(tmp_path / "alone" / file)), file
    assert sorted(shared.expert_tokens) == sorted(alone.expert_tokens) != []
    for table in ("importance", "expert_tokens"):
        ours, theirs = getattr(shared, table), getattr(alone, table)
        assert all(np.array_equal(ours[name], theirs[name]) for name in theirs), table


def test_config_counts_of_experts_are_checked(mixtral: Path, tmp_path: Path) -> None:
    folder = copy_with(mixtral, tmp_path / "bad", lambda weights: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_experts_per_tok": 0}))
    with pytest.raises(CheckpointError, match="num_experts_per_tok must be at least 1"):
        Checkpoint.open(folder)


@pytest.mark.parametrize(("model_type", "config"), [
    ("olmoe", {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16}),
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                   "shared_expert_intermediate_size": 24, "intermediate_size": 48, "mlp_only_layers": [2]}),
])
def test_other_expert_families_stream_what_transformers_loads(model_type: str, config: dict, tmp_path: Path) -> None:
    """OLMoE (q/k norms over the projection) and Qwen2-MoE (a shared expert with its sigmoid gate, q/k/v biases):
    described, read from the hub's per-expert files, streamed as transformers' own parameters."""
    source = save_tiny(tmp_path / model_type, model_type, **config)
    checkpoint = Checkpoint.open(source)
    spec = checkpoint.spec
    assert spec.experts.count == 4 and spec.experts.used == 2
    if model_type == "qwen2_moe":
        assert spec.experts.shared_intermediate_size == 24 and spec.qkv_bias and spec.sparse_layers == [0, 1]
    else:
        assert spec.qk_norm == "projection" and spec.sparse_layers == [0, 1, 2]
    loaded = load_file(stacked_copy(source, tmp_path / "stacked") / "model.safetensors")
    streamed = {info.name: array for info, array in checkpoint.tensors()}
    assert sorted(streamed) == sorted(loaded)
    for name, array in streamed.items():
        np.testing.assert_array_equal(array, loaded[name].float().numpy(), err_msg=name)


def test_olmoe_with_clipped_qkv_is_refused(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "olmoe", "olmoe", num_experts=4, num_experts_per_tok=2, intermediate_size=16,
                       clip_qkv=8.0)
    with pytest.raises(CheckpointError, match=r"clip_qkv \(8.0\) is not supported"):
        Checkpoint.open(source)


def test_qwen3_moe_slides_every_layer_when_its_config_says_so() -> None:
    family = registry.for_config({"architectures": ["Qwen3MoeForCausalLM"]})
    base = {"model_type": "qwen3_moe", **TINY, **QWEN3_MOE, "sliding_window": 64}
    assert {layer.window for layer in family.spec(base | {"use_sliding_window": True}).layers} == {64}
    assert {layer.window for layer in family.spec(base | {"use_sliding_window": False}).layers} == {None}


@pytest.mark.slow
def test_one_recipe_converts_a_mixture_of_experts_to_every_format(tmp_path: Path) -> None:
    """Qwen3-MoE through `siliconvert recipe`: MLX 4-bit, GGUF F16 + Q4_K_M and Core ML FP16 from one read, each
    scored with its routers' agreement with the reference's, gated, and shown in the report and model cards."""
    import subprocess

    import yaml
    from families import FAMILY_CASES

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES["qwen3_moe"]
    source = small_checkpoint(None, "qwen3_moe", tokenizer, config=config)
    recipe = {"name": "moe", "source": str(source), "output": str(tmp_path / "out"),
              "targets": [{"format": "mlx", "bits": 4}, {"format": "gguf", "quants": ["F16", "Q4_K_M"]},
                          {"format": "coreml", "context": 128}],
              "validate": {"tokens": 256, "context": 128, "latency": False,
                           "gates": {"max_mean_kld": 0.06, "min_router_agreement": 0.85}},
              "release": {"repo_prefix": "org/Moe"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([SILICONVERT, "recipe", str(tmp_path / "recipe.yaml")],
                            capture_output=True, text=True, env={**__import__("os").environ, "SILICONVERT_QUIET": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["source_info"]["traits"]["experts"] == "2 of 4"
    agreements = {f"{a['format']} {a['quant']}": a["router_agreement"] for a in report["artifacts"]}
    assert set(agreements) == {"mlx 4bit-g64", "gguf F16", "gguf Q4_K_M", "coreml fp16"}
    for label, agreement in agreements.items():
        assert agreement["measured"], label
        assert [entry["layer"] for entry in agreement["layers"]] == [0, 1]
        assert agreement["same_experts"] >= (0.97 if label in ("gguf F16", "coreml fp16") else 0.85), label
    assert "## Router agreement (mixture of experts)" in (tmp_path / "out" / "report.md").read_text()
    cards = list((tmp_path / "out" / "release").glob("*/README.md"))
    assert cards and all("Routers of" in card.read_text() for card in cards)
