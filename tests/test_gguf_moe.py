"""GGUF mixtures of experts: llama.cpp's expert tensors and keys, what it cannot express refused by trait, the
stacks quantized as llama.cpp's own quantizer does (importance matrix per expert), the runner's router view."""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from families import FAMILY_CASES
from test_gguf import assert_same_model, convert, fields, whole_file_quantization
from test_moe import MIXTRAL, QWEN3_MOE, TINY

from siliconvert.calibration import Calibrations, calibration_text
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.gguf import GGUFWriter
from siliconvert.demo import small_checkpoint
from siliconvert.errors import CheckpointError
from siliconvert.quantize.gguf import _ggml, _GGMLInitParams
from siliconvert.recipe import GGUFTarget
from siliconvert.validate.runners.gguf import GGMLTensor

pytestmark = pytest.mark.slow

QWEN3_MOE_ROUTED = QWEN3_MOE | {"norm_topk_prob": True, "mlp_only_layers": []}  # what llama.cpp's qwen3moe runs
# a shared expert of another width than the routed ones; the chosen weights not renormalised
QWEN2_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "intermediate_size": 48,
             "shared_expert_intermediate_size": 24, "qkv_bias": True}
OLMOE = {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16}  # TINY's 2 kv heads for 4 q heads
CONFIGS = {"qwen3_moe": QWEN3_MOE_ROUTED, "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "olmoe": OLMOE}
ARCH = {"qwen3_moe": "qwen3moe", "mixtral": "llama", "qwen2_moe": "qwen2moe", "olmoe": "olmoe"}


def save_tiny(folder: Path, family: str, **config) -> Path:
    """A random-weight MoE checkpoint of test_moe's tiny sizes (as transformers saves it), with the tokenizer of
    the family's trained test checkpoint, which GGUF can carry."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer, trained_config = FAMILY_CASES[family]
    trained = small_checkpoint(None, family, tokenizer, config=trained_config)
    torch.manual_seed(0)
    vocab = Checkpoint.open(trained).spec.vocab_size
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **(TINY | config | {"vocab_size": vocab})))
    model.to(torch.bfloat16).save_pretrained(folder)
    for file in trained.iterdir():
        if file.name.startswith("tokenizer"):
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny_moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp(request.param), request.param, **CONFIGS[request.param])


def test_expert_stacks_and_keys_are_llama_cpps(tiny_moe: Path, tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(tiny_moe)
    spec, arch = checkpoint.spec, ARCH[checkpoint.spec.family]
    [artifact] = convert(tiny_moe, tmp_path, ["F16"])
    keys = fields(artifact.path)
    assert keys[f"{arch}.expert_count"] == 4 and keys[f"{arch}.expert_used_count"] == 2
    if arch in ("llama", "olmoe"):  # these size the experts by the dense key and read no expert key
        assert keys[f"{arch}.feed_forward_length"] == 16 and f"{arch}.expert_feed_forward_length" not in keys
    else:
        assert keys[f"{arch}.expert_feed_forward_length"] == 16
    tensors = {t.name: t for t in gguf.GGUFReader(artifact.path).tensors}
    stream = {info.name: array for info, array in checkpoint.tensors()}
    for layer in spec.sparse_layers:
        stack = stream[f"model.layers.{layer}.mlp.experts.gate_up_proj"]  # [experts, 2·ff, hidden]
        expected = {"ffn_gate_exps": stack[:, :16], "ffn_up_exps": stack[:, 16:],
                    "ffn_down_exps": stream[f"model.layers.{layer}.mlp.experts.down_proj"]}
        for role, values in expected.items():
            tensor = tensors[f"blk.{layer}.{role}.weight"]
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(np.asarray(tensor.data).reshape(values.shape), values.astype(np.float16))
        router = tensors[f"blk.{layer}.ffn_gate_inp.weight"]
        assert router.tensor_type == gguf.GGMLQuantizationType.F32  # as llama.cpp's converter keeps it
        np.testing.assert_array_equal(np.asarray(router.data), stream[f"model.layers.{layer}.mlp.gate.weight"])
    assert not any(".ffn_gate." in name or ".ffn_up." in name for name in tensors)
    if spec.experts.shared_intermediate_size:
        assert keys[f"{arch}.expert_shared_feed_forward_length"] == 24
        for layer in spec.sparse_layers:
            for role, part in {"ffn_gate_shexp": "shared_expert.gate_proj", "ffn_up_shexp": "shared_expert.up_proj",
                               "ffn_down_shexp": "shared_expert.down_proj"}.items():
                values = stream[f"model.layers.{layer}.mlp.{part}.weight"]
                tensor = tensors[f"blk.{layer}.{role}.weight"]
                np.testing.assert_array_equal(np.asarray(tensor.data).reshape(values.shape), values.astype(np.float16))
            gate = tensors[f"blk.{layer}.ffn_gate_inp_shexp.weight"]
            assert gate.tensor_type == gguf.GGMLQuantizationType.F32  # a router, as llama.cpp's converter keeps it
            np.testing.assert_array_equal(np.asarray(gate.data).reshape(1, -1),
                                          stream[f"model.layers.{layer}.mlp.shared_expert_gate.weight"])
    else:
        assert not any("shexp" in name for name in tensors)


def test_olmoe_kv_heads_are_repeated_per_q_head(tmp_path: Path) -> None:
    """llama.cpp's olmoe sizes k, v and the k norm as the hidden state: each of the source's kv heads is written
    once per q head that reads it (GQA's grouping), the norm over the projection with them."""
    source = save_tiny(tmp_path / "source", "olmoe", **OLMOE)
    spec = Checkpoint.open(source).spec
    [artifact] = convert(source, tmp_path, ["F16"])
    assert fields(artifact.path)["olmoe.attention.head_count_kv"] == spec.num_heads == 2 * spec.num_kv_heads
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(artifact.path).tensors}
    stream = {info.name: array for info, array in Checkpoint.open(source).tensors()}
    for part, role in (("k_proj.weight", "attn_k.weight"), ("v_proj.weight", "attn_v.weight"),
                       ("k_norm.weight", "attn_k_norm.weight")):
        values = stream[f"model.layers.0.self_attn.{part}"]
        heads = values.reshape(spec.num_kv_heads, spec.head_dim, -1)
        expected = np.stack([heads[0], heads[0], heads[1], heads[1]]).reshape(-1, *values.shape[1:])
        written = tensors[f"blk.0.{role}"].reshape(expected.shape)
        np.testing.assert_array_equal(written, expected.astype(written.dtype))


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "olmo2"])
def test_a_tied_head_is_written_where_the_graph_requires_one(family: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's qwen2moe, olmoe and olmo2 load output.weight without falling back to token_embd: a tied
    checkpoint's embedding is written again as the head, the file loads and computes the source function, and
    the streamed quants are still llama_model_quantize's."""
    from transformers import AutoModelForCausalLM

    from siliconvert.validate.metrics import compare
    from siliconvert.validate.runners.gguf import LlamaCppRunner

    source = save_tiny(tmp_path / "source", family, **(CONFIGS.get(family, {}) | {"tie_word_embeddings": True}))
    assert "lm_head.weight" not in Checkpoint.open(source).tensor_infos
    streamed = {a.quant: a.path for a in convert(source, tmp_path / "streamed", ["F16", "Q4_K_M"])}
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(streamed["F16"]).tensors}
    np.testing.assert_array_equal(tensors["output.weight"], tensors["token_embd.weight"])
    tokens = np.random.default_rng(0).integers(0, Checkpoint.open(source).spec.vocab_size, size=48)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model(torch.as_tensor(tokens[None])).logits[0].numpy()
    runner = LlamaCppRunner(streamed["F16"], {"context": 64})
    try:
        logits = runner.logits(tokens)
    finally:
        runner.close()
    assert compare(reference[:-1], logits[:-1], tokens[1:])[0].mean_kld < 0.001
    whole_file_quantization(monkeypatch)
    assert_same_model(streamed["Q4_K_M"], convert(source, tmp_path / "whole", ["F16", "Q4_K_M"])[1].path)


@pytest.mark.parametrize(("family", "config", "trait"), [
    ("qwen3_moe", {"norm_topk_prob": False}, "normalize_topk"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "dense_layers"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "dense_layers"),
    ("qwen2_moe", {"norm_topk_prob": True}, "normalize_topk"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "dense_layers"),
    ("qwen2_moe", {"decoder_sparse_step": 2}, "dense_layers"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert"),
    ("qwen2_moe", {"num_experts": 0}, "experts"),
    ("olmoe", {"norm_topk_prob": True}, "normalize_topk"),
    ("olmoe", {"attention_bias": True}, "attn_output_bias"),
])
def test_what_llama_cpps_graph_cannot_run_is_refused(family: str, config: dict, trait: str, tmp_path: Path) -> None:
    """llama.cpp's qwen3moe renormalises the chosen weights, qwen2moe and olmoe never do; all run the experts in
    every layer, qwen2moe a shared expert beside them, and olmoe has no attention output bias, whatever the file
    says: a checkpoint that does otherwise is refused, naming the trait."""
    source = save_tiny(tmp_path / "source", family, **(CONFIGS[family] | config))
    with pytest.raises(CheckpointError, match=f"cannot honour the trait {trait}"):
        GGUFWriter(Checkpoint.open(source), GGUFTarget(format="gguf", quants=["F16"]), tmp_path / "out", "m")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def trained_moe(request: pytest.FixtureRequest) -> Path:
    tokenizer, config = FAMILY_CASES[request.param]
    return small_checkpoint(None, request.param, tokenizer, config=config)


@pytest.mark.parametrize("imatrix", [None, "builtin"])
def test_streamed_expert_quants_are_llama_quantizes_bytes(trained_moe: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, imatrix: str | None) -> None:
    """The expert stacks, quantized per expert from views of the stream (gate and up never copied out), with the
    per-expert importance matrix, are what llama_model_quantize makes of a full-precision file: the same types
    (the router left F32) and bytes."""
    quants = ["Q4_K_M", "Q8_0"]
    streamed = {a.quant: a.path for a in convert(trained_moe, tmp_path / "streamed", quants, imatrix=imatrix)}
    whole_file_quantization(monkeypatch)
    whole = {a.quant: a.path for a in convert(trained_moe, tmp_path / "whole", quants, imatrix=imatrix)}
    for quant in quants:
        assert_same_model(streamed[quant], whole[quant])
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(streamed["Q4_K_M"]).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types.get("blk.0.ffn_gate_inp_shexp.weight", gguf.GGMLQuantizationType.F32) == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_up_exps.weight"] != gguf.GGMLQuantizationType.F32


def test_mxfp4_moe_and_i_quant_experts_are_llama_quantizes_bytes(trained_moe: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """MXFP4_MOE puts the expert stacks in MXFP4 and the rest in Q8_0; IQ3_XXS quantizes each expert with its own
    row of the importance matrix (computed: llama.cpp refuses IQ3_XXS without one): both as llama_model_quantize."""
    quants = ["MXFP4_MOE", "IQ3_XXS"]
    streamed = {a.quant: a.path for a in convert(trained_moe, tmp_path / "streamed", quants)}
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(streamed["MXFP4_MOE"]).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == gguf.GGMLQuantizationType.MXFP4
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    whole_file_quantization(monkeypatch)
    whole = {a.quant: a.path for a in convert(trained_moe, tmp_path / "whole", quants)}
    for quant in quants:
        assert_same_model(streamed[quant], whole[quant])


def test_the_plan_knows_the_expert_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's Q4_K_M keeps attn_k and attn_v of an 8-expert model at Q8_0 (Mixtral 8x7B's rule): the streamed
    plan, told the expert count, chooses what llama_model_quantize chooses reading expert_count from the file."""
    source = save_tiny(tmp_path / "source", "mixtral", **(MIXTRAL | {"num_local_experts": 8, "hidden_size": 256,
                                                                       "head_dim": 64, "intermediate_size": 256}))
    [streamed] = convert(source, tmp_path / "streamed", ["Q4_K_M"])
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(streamed.path).tensors}
    assert types["blk.0.attn_v.weight"] == types["blk.0.attn_k.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q4_K
    whole_file_quantization(monkeypatch)
    assert_same_model(streamed.path, convert(source, tmp_path / "whole", ["Q4_K_M"])[0].path)


def test_importance_matrix_has_a_row_per_expert(trained_moe: Path) -> None:
    """Each expert's row of the gate/up statistics is the mean x² of the tokens transformers' router sent to that
    expert, from the whole model run at once; the run also counts those tokens (what a plan weighs experts by)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, text = calibration_text("builtin")
    calibration = Calibrations(Checkpoint.open(trained_moe), None, tokens=512, context=128)
    matrix, counted = calibration.importance("builtin"), calibration.expert_tokens("builtin")
    spec = Checkpoint.open(trained_moe).spec
    ids = AutoTokenizer.from_pretrained(trained_moe)(text[:512 * 16], add_special_tokens=False)["input_ids"][:512]
    model = AutoModelForCausalLM.from_pretrained(trained_moe, dtype=torch.float32).eval()
    routed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in spec.sparse_layers}
    for layer in spec.sparse_layers:
        model.model.layers[layer].mlp.gate.register_forward_hook(
            lambda _m, args, output, layer=layer: routed[layer].append((args[0].double(), output[-1])))
    with torch.inference_mode():
        for start in range(0, 512, 128):
            model(torch.tensor([ids[start:start + 128]]))
    for layer in spec.sparse_layers:
        hidden = torch.cat([x for x, _ in routed[layer]])
        chosen = torch.cat([c for _, c in routed[layer]])
        stack = matrix[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        assert stack.shape == (spec.experts.count, spec.hidden_size)
        for expert in range(spec.experts.count):
            tokens = hidden[(chosen == expert).any(-1)]
            expected = (tokens**2).mean(0).float().numpy() if len(tokens) else np.ones(spec.hidden_size)
            np.testing.assert_allclose(stack[expert], expected, rtol=1e-5, atol=1e-12, err_msg=f"{layer}/{expert}")
            for part in ("gate_up_proj", "down_proj"):
                assert counted[f"model.layers.{layer}.mlp.experts.{part}"][expert] == len(tokens)
        down = matrix[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert down.shape == (spec.experts.count, spec.experts.intermediate_size) and (down >= 0).all()


def test_the_runners_view_of_a_ggml_tensor_is_ggmls() -> None:
    """The eval callback reads nodes through GGMLTensor: its fields sit where this ggml puts them."""
    ggml = _ggml()
    ggml.ggml_get_name.argtypes, ggml.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_void_p
    context = ggml.ggml_init(_GGMLInitParams(ggml.ggml_tensor_overhead() * 2, None, True))
    try:
        ne = (ctypes.c_int64 * 2)(2, 7)
        handle = ggml.ggml_new_tensor(context, 26, 2, ne)  # GGML_TYPE_I32, [7 tokens, k = 2]
        ggml.ggml_set_name(handle, b"ffn_moe_topk-3")
        node = GGMLTensor.from_address(handle)
        assert node.name == b"ffn_moe_topk-3" and node.type == 26
        assert list(node.ne) == [2, 7, 1, 1] and list(node.nb)[:2] == [4, 8]
        assert ggml.ggml_get_name(handle) == handle + GGMLTensor.name.offset
    finally:
        ggml.ggml_free(context)


def test_watching_the_routers_changes_nothing_llama_cpp_computes(tiny_moe: Path, tmp_path: Path) -> None:
    """Scoring windows runs a context with the eval callback; its logits are those of the plain context, and the
    context that decodes through the KV cache afterwards has no callback and still works."""
    from siliconvert.validate.runners.gguf import LlamaCppRunner

    spec = Checkpoint.open(tiny_moe).spec
    [artifact] = convert(tiny_moe, tmp_path, ["F16"])
    windows = np.random.default_rng(0).integers(0, spec.vocab_size, size=(2, 40))
    runner = LlamaCppRunner(artifact.path, {"context": 64})
    try:
        assert runner.expert_choices() is None and "router" in runner.unmeasured()  # nothing scored yet
        plain = np.stack([runner.logits(window) for window in windows])
        watched = runner.logits_many(windows)
        choices = runner.expert_choices()
        cached = runner.cached_logits(windows[0][:30], windows[0][30:])
    finally:
        runner.close()
    np.testing.assert_array_equal(watched, plain)
    assert runner.unmeasured() == {}
    assert choices.shape == (2, 40, spec.num_layers, spec.experts.used)
    assert ((choices >= 0) & (choices < spec.experts.count)).all()
    assert (np.sort(choices, axis=-1)[..., 1:] != np.sort(choices, axis=-1)[..., :-1]).all()  # k distinct experts
    np.testing.assert_allclose(cached, plain[0][29:], atol=1e-3)


@pytest.fixture(scope="module")
def gpt_oss_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained gpt-oss case with its experts in MXFP4 as the hub ships them, as it is (YaRN untruncated, as
    gpt-oss-20b's config) and with truncate: true (the YaRN llama.cpp computes)."""
    import json
    import shutil

    from families import gpt_oss_mxfp4

    untruncated = gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss") / "mxfp4")
    truncated = tmp_path_factory.mktemp("gpt_oss") / "mxfp4-truncated"
    shutil.copytree(untruncated, truncated)
    config = json.loads((truncated / "config.json").read_text())
    config["rope_parameters"]["truncate"] = True
    (truncated / "config.json").write_text(json.dumps(config))
    return {"untruncated": untruncated, "truncated": truncated}


def test_gpt_oss_keeps_its_mxfp4_experts_exact(gpt_oss_sources: dict[str, Path], tmp_path: Path) -> None:
    """gpt-oss's F16 and Q4_K_M files (the latter with an importance matrix): the expert stacks that arrived as MXFP4
    are llama.cpp's MXFP4, each value the source's own; their biases, the routers and the sinks F32; gate and up
    taken apart from gpt-oss's interleaved rows; the window's pattern and the expert size as keys."""
    with pytest.warns(UserWarning, match="yarn_untruncated"):
        artifacts = {a.quant: a.path for a in convert(gpt_oss_sources["untruncated"], tmp_path, ["F16", "Q4_K_M"],
                                                      imatrix="builtin")}
    checkpoint = Checkpoint.open(gpt_oss_sources["untruncated"])
    stream = {info.name: array for info, array in checkpoint.tensors()}
    keys = fields(artifacts["F16"])
    assert keys["gpt-oss.expert_feed_forward_length"] == 96 and keys["gpt-oss.attention.sliding_window"] == 24
    assert list(keys["gpt-oss.attention.sliding_window_pattern"]) == [True, False]
    for path in artifacts.values():
        tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
        for layer in (0, 1):
            experts = f"model.layers.{layer}.mlp.experts"
            gate_up = stream[f"{experts}.gate_up_proj"]
            stacks = {"gate": gate_up[:, :96], "up": gate_up[:, 96:], "down": stream[f"{experts}.down_proj"]}
            biases = {"gate": stream[f"{experts}.gate_up_proj_bias"][:, :96],
                      "up": stream[f"{experts}.gate_up_proj_bias"][:, 96:], "down": stream[f"{experts}.down_proj_bias"]}
            for part, values in stacks.items():
                tensor = tensors[f"blk.{layer}.ffn_{part}_exps.weight"]
                assert tensor.tensor_type == gguf.GGMLQuantizationType.MXFP4
                dequantized = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(values.shape)
                np.testing.assert_array_equal(dequantized, values)
                bias = tensors[f"blk.{layer}.ffn_{part}_exps.bias"]
                assert bias.tensor_type == gguf.GGMLQuantizationType.F32
                np.testing.assert_array_equal(np.asarray(bias.data).reshape(biases[part].shape), biases[part])
            for name in ("ffn_gate_inp.weight", "ffn_gate_inp.bias", "attn_sinks.weight"):
                assert tensors[f"blk.{layer}.{name}"].tensor_type == gguf.GGMLQuantizationType.F32
    gate_up = stream["model.layers.0.mlp.experts.gate_up_proj"]  # [experts, 2·ff, hidden]: gate rows, then up rows
    stored = Checkpoint.open(gpt_oss_sources["untruncated"]).tensor_infos["model.layers.0.mlp.experts.gate_up_proj"]
    from siliconvert.checkpoint import read_model_tensor

    transformers_layout = read_model_tensor(stored)  # [experts, hidden, 2·ff], gate and up interleaved
    np.testing.assert_array_equal(gate_up[:, :96], transformers_layout[..., 0::2].swapaxes(1, 2))


def test_llama_cpp_computes_gpt_oss_but_for_untruncated_yarn(gpt_oss_sources: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """With YaRN's correction range truncated (what llama.cpp computes) the F16 file, MXFP4 experts and all, is
    transformers' function (mean KLD under 0.001; llama.cpp's MXFP4 kernels round activations to 8 bits) and its
    routers choose transformers' experts; untruncated, as gpt-oss ships, the rope's middle dimensions rotate at other
    frequencies in llama.cpp and that alone costs a mean KLD of a few thousandths on this model: the figure llama.cpp's
    own converter reaches (0.0038 in issue #27)."""
    from conftest import reference_choices_for, reference_logits_for
    from transformers import AutoTokenizer

    from siliconvert.textdata import heldout_text
    from siliconvert.validate.metrics import compare
    from siliconvert.validate.router import router_agreement
    from siliconvert.validate.runners.gguf import LlamaCppRunner

    klds = {}
    for case, source in gpt_oss_sources.items():
        ids = AutoTokenizer.from_pretrained(source)(heldout_text()[:20_000], add_special_tokens=False)["input_ids"]
        windows = np.array(ids[:2 * 128]).reshape(2, 128)
        targets = np.array(ids[1:2 * 128 + 1]).reshape(2, 128)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # yarn_untruncated: measured here
            [artifact] = convert(source, tmp_path / case, ["F16"])
        runner = LlamaCppRunner(artifact.path, {"context": 128})
        try:
            logits = runner.logits_many(windows)
            choices = runner.expert_choices()
        finally:
            runner.close()
        reference = reference_logits_for(source, windows)
        vocab = reference.shape[-1]
        klds[case] = compare(reference.reshape(-1, vocab), logits.reshape(-1, vocab), targets.reshape(-1))[0].mean_kld
        if case == "truncated":
            agreement = router_agreement(reference_choices_for(source, windows), choices, [0, 1])
            assert agreement["same_experts"] >= 0.95, agreement
    assert klds["truncated"] < 0.001 < klds["untruncated"] < 0.01, klds


def test_the_report_says_where_mxfp4_was_kept_and_where_re_quantized(gpt_oss_sources: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """One recipe on the MXFP4 source: the report names the source's quantization, and per artifact whether its
    MXFP4 tensors were kept (GGUF F16, MLX 4-bit) or re-quantized (MLX 3-bit: fewer bits than MXFP4's 4.25), so the
    KLD difference between them is what re-quantizing cost. (GGUF's K-quants fall back to 4.5-bit types on rows of
    128: this model's Q3_K_M keeps MXFP4 too.)"""
    from conftest import run_recipe

    report = run_recipe(gpt_oss_sources["truncated"], tmp_path, "gpt-oss-mxfp4",
                        targets=[{"format": "gguf", "quants": ["F16", "Q3_K_M"]},
                                 {"format": "mlx", "bits": 4}, {"format": "mlx", "bits": 3}],
                        validate={"tokens": 256, "context": 128, "latency": False,  # 3 bits on 0.7M parameters:
                                  "gates": {"max_mean_kld": 1.0, "min_same_top1": 0.5, "max_ppl_ratio": 2.0}})
    assert report["source_info"]["quantization"].startswith("MXFP4 weights")
    said = {f"{a['format']} {a['quant']}": a["source_quantization"] for a in report["artifacts"]}
    assert said["gguf F16"] == "MXFP4 kept exact in 6 of 6 tensors"
    assert said["gguf Q3_K_M"] == "MXFP4 kept exact in 6 of 6 tensors"
    assert said["mlx 4bit-g64"] == "MXFP4 kept exact in 6 modules (mlx's mxfp4 mode)"
    assert said["mlx 3bit-g64"] == "MXFP4 re-quantized in 6 of 6 modules (as 3-bit affine)"
    klds = {f"{a['format']} {a['quant']}": a["metrics"]["mean_kld"] for a in report["artifacts"]}
    assert klds["gguf F16"] < 0.001 and klds["mlx 4bit-g64"] < klds["mlx 3bit-g64"]
    assert "## Weights that arrived quantized" in (tmp_path / "out" / "report.md").read_text()
