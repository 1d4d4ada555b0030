"""The checkpoint reader: headers checked, tensors streamed one at a time, exact values."""

import contextlib
import json
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from siliconvert.architectures import TensorRole
from siliconvert.checkpoint import Checkpoint, read_safetensors_header
from siliconvert.errors import CheckpointError


def test_streams_every_tensor_with_exact_values(random_llama):
    checkpoint = Checkpoint.open(random_llama)
    expected = load_file(random_llama / "model.safetensors")
    seen = []
    for info, array in checkpoint.tensors():
        name = info.name
        seen.append(name)
        assert array.dtype == np.float32  # bf16 widened exactly
        np.testing.assert_array_equal(array, expected[name].float().numpy())
    assert sorted(seen) == sorted(expected)
    assert checkpoint.spec.rope_theta == 20000.0
    assert checkpoint.name == random_llama.name


def test_sharded_checkpoint_reads_the_same(random_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_llama, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shutil.copy(random_llama / "tokenizer.json", tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    one = {info.name: array for info, array in Checkpoint.open(random_llama).tensors()}
    sharded = Checkpoint.open(tmp_path)
    assert len({i.shard for i in sharded.tensor_infos.values()}) > 1
    many = {info.name: array for info, array in sharded.tensors()}
    assert one.keys() == many.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], many[name])


def test_stream_order_is_stable(random_llama):
    first = [info.name for info, _ in Checkpoint.open(random_llama).tensors()]
    assert first == [info.name for info, _ in Checkpoint.open(random_llama).tensors()]


def test_the_stream_carries_each_tensors_role(random_llama):
    """Roles are resolved once, when the checkpoint opens: the infos writers plan from and the stream carry them."""
    checkpoint = Checkpoint.open(random_llama)
    streamed = [info for info, _ in checkpoint.tensors()]
    assert streamed == checkpoint.stream_order()
    for info in streamed:
        assert info.role == checkpoint.family.role_of(info.name) is not None
    assert streamed[0].role == TensorRole("token_embd", None, "weight")
    layers = [info.role.layer for info in streamed[1:-2]]
    assert layers == sorted(layers) and set(layers) == {0, 1}  # embedding, layer 0, layer 1, then norm and head
    assert {info.role.role for info in streamed[-2:]} == {"output_norm", "output"}


def test_rotary_caches_and_a_tied_heads_stored_copy_never_stream(random_llama, tmp_path):
    """A tied checkpoint that stores its head anyway, and a rotary cache: neither reaches a writer (the embedding
    is the head; every target rebuilds the rotary frequencies), and the rest streams in the same order."""
    folder = _copy(random_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    tied = Checkpoint.open(folder)
    streamed = [info.name for info, _ in tied.tensors()]
    assert "lm_head.weight" not in streamed and not any("rotary_emb" in name for name in streamed)
    assert sorted(streamed) == sorted(tied.tensor_infos) == sorted(tied.family.expected_tensors(tied.spec))
    untied = [info.name for info in Checkpoint.open(random_llama).stream_order()]
    assert streamed == [name for name in untied if name != "lm_head.weight"]


def _copy(random_llama, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(random_llama, folder)
    return folder


def test_truncated_shard_is_named(random_llama, tmp_path):
    folder = _copy(random_llama, tmp_path)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        Checkpoint.open(folder)
    assert "model.safetensors" in str(e.value)


def test_tensor_with_wrong_shape_for_config(random_llama, tmp_path):
    folder = _copy(random_llama, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight' has shape \[64, 32\], config.json implies"):
        Checkpoint.open(folder)


def test_nan_weights_are_refused(tmp_path, random_llama):
    from safetensors.torch import save_file

    folder = _copy(random_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN"):
        list(Checkpoint.open(folder).tensors())


def test_pickle_only_checkpoint_is_refused(tmp_path, random_llama):
    folder = _copy(random_llama, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint.open(folder)


def _safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "no header"),
    (struct.pack("<Q", 1 << 40) + b"{}", "absurd"),
    (_safetensors(b"{not json"), "not valid JSON"),
    (_safetensors(b"[1, 2]"), "not a JSON object"),
    (_safetensors(json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(), b"x"),
     "unknown dtype"),
    (_safetensors(json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(), b"1234"),
     "do not match"),
    (_safetensors(json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), b"1234"),
     "truncated"),
])
def test_bad_headers(tmp_path, content, problem):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem):
        read_safetensors_header(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_header_reader_never_crashes_on_garbage(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    with contextlib.suppress(CheckpointError):
        read_safetensors_header(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=8), st.one_of(
    st.integers(), st.text(max_size=5), st.lists(st.integers(-2, 10), max_size=3),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "X"]),
                           "shape": st.lists(st.integers(-1, 4), max_size=3),
                           "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3)})),
    max_size=4))
def test_header_reader_checks_structured_headers(tmp_path, header):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_safetensors(json.dumps(header).encode(), bytes(64)))
    try:
        infos = read_safetensors_header(path)
    except CheckpointError:
        return
    for info in infos.values():  # whatever was accepted fits inside the file
        assert info.offset + info.nbytes <= path.stat().st_size


def test_pickle_checkpoint_loads_weights_only_when_allowed(tmp_path, random_llama):
    folder = _copy(random_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        Checkpoint.open(folder)
    checkpoint = Checkpoint.open(folder, allow_pickle=True)
    for info, array in checkpoint.tensors():
        np.testing.assert_array_equal(array, tensors[info.name].float().numpy())


def test_pickle_that_would_run_code_is_refused_even_when_allowed(tmp_path, random_llama):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    folder = _copy(random_llama, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(CheckpointError, match="weights-only"):
        Checkpoint.open(folder, allow_pickle=True)


def test_a_special_token_id_past_the_vocabulary_is_said_not_fatal(random_llama, tmp_path):
    """transformers' config classes carry their family's ids (OLMo's eos 50279): a small model built from one keeps
    them. No embedding row holds such an id, so the checkpoint opens, with a warning naming the file and the key."""
    folder = tmp_path / "ckpt"
    shutil.copytree(random_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 50279}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 96]}))
    with pytest.warns(UserWarning) as warned:
        Checkpoint.open(folder)
    messages = [str(w.message) for w in warned]
    assert any("config.json: eos_token_id 50279 is outside the model's vocabulary of 96" in m for m in messages)
    assert any("generation_config.json: eos_token_id 96 is outside" in m for m in messages)


@pytest.mark.parametrize(("key", "settings", "message"), [
    ("quantization_config", {"quant_method": "gptq", "bits": 4, "group_size": 128},
     "quantization_config.quant_method is 'gptq': the weights are quantized"),
    ("quantization_config", {"quant_method": "compressed-tensors", "format": "pack-quantized"},
     "quant_method is 'compressed-tensors'"),
    ("quantization_config", {"quant_method": "fp8", "activation_scheme": "static"},
     "FP8 with static activation scales is not supported"),
    ("compression_config", {"quant_method": "sparseml"}, "compression_config.quant_method is 'sparseml'"),
    ("quantization", {"group_size": 64, "bits": 4}, "quantization.quant_method is 'mlx'"),
])
def test_a_quantized_checkpoint_is_refused_by_its_method(random_llama, tmp_path, key, settings, message):
    """Its weights are never read as floats: the refusal comes from config.json, before any shard is indexed."""
    folder = _copy(random_llama, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {key: settings}))
    (folder / "model.safetensors").write_bytes(b"")  # never opened
    with pytest.raises(CheckpointError, match=message) as e:
        Checkpoint.open(folder)
    assert e.value.where == str(folder / "config.json")


@pytest.mark.parametrize(("change", "named"), [
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float().to(torch.float8_e5m2)}),
     "'model.norm.weight' has dtype F8_E5M2"),
    (lambda t: t.update({"model.layers.1.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1)}),
     "'model.layers.1.self_attn.o_proj.weight_scale_inv' (F32 [1, 1]) is part of a quantized weight"),
    (lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj_blocks": torch.zeros(2, 4, dtype=torch.uint8)}),
     "gate_up_proj_blocks' (U8 [2, 4]) is part of a quantized weight"),
])
def test_quantized_tensors_are_refused_without_a_quantization_config(random_llama, tmp_path, change, named):
    """A quantized export whose config.json lost its quantization_config is still refused, naming a tensor."""
    folder = _copy(random_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(named)):
        Checkpoint.open(folder)


def test_qwen3_5_as_the_hub_ships_it_converts_its_language_model(tmp_path):
    """Qwen3_5ForConditionalGeneration: the language model's config and tensors, as Qwen3_5ForCausalLM names them;
    the vision tower and the multi-token-prediction head dropped with a warning that counts them."""
    from families import qwen3_5_multimodal

    from siliconvert.architectures import ConfigWarning

    path = qwen3_5_multimodal(tmp_path / "qwen3_5")
    with pytest.warns(ConfigWarning, match=r"the vision tower and the multi-token-prediction head \(\d+ tensors\)"):
        checkpoint = Checkpoint.open(path)
    assert checkpoint.spec.family == "qwen3_5" and checkpoint.config["model_type"] == "qwen3_5_text"
    assert checkpoint.config["architectures"] == ["Qwen3_5ForCausalLM"]
    names = set(checkpoint.tensor_infos)
    assert "model.layers.0.linear_attn.A_log" in names and "lm_head.weight" in names
    assert not any(name.startswith(("model.visual", "mtp", "model.language_model")) for name in names)


def fp8_source(source, folder, block: list[int] | None):
    """`source` with every decoder-layer weight quantized to FP8 (E4M3) as transformers' FP8 quantizer stores it:
    per block of `block` (per tensor: None) the scale amax / 448 beside the weight as `<weight>_scale_inv`."""
    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    stored = {}
    for name, tensor in weights.items():
        if tensor.ndim != 2 or ".layers." not in name:
            stored[name] = tensor
            continue
        rows, cols = tensor.shape
        block_rows, block_cols = block or (rows, cols)
        grid_rows, grid_cols = -(-rows // block_rows), -(-cols // block_cols)
        padded = torch.zeros(grid_rows * block_rows, grid_cols * block_cols)
        padded[:rows, :cols] = tensor.float()
        blocks = padded.view(grid_rows, block_rows, grid_cols, block_cols)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        quantized = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols]
        stored[name] = quantized.to(torch.float8_e4m3fn).contiguous()
        stored[name + "_scale_inv"] = scale if block else scale.reshape(())
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": block, "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_an_fp8_source_reads_as_transformers_dequantizes_it(random_llama, tmp_path):
    """FP8 weights with 16×16 block scales: every tensor read equals what transformers' own FP8 dequantization
    loads, bit for bit; the checkpoint says how it arrived and hands the targets a float config."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from siliconvert.checkpoint import read_tensor

    folder = fp8_source(random_llama, tmp_path / "fp8", [16, 16])
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.quantization.method == "fp8" and "16×16 block scales" in checkpoint.quantization.description
    assert "quantization_config" not in checkpoint.config
    assert not any(name.endswith("_scale_inv") for name in checkpoint.tensor_infos)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                 dtype=torch.float32)
    parameters = dict(model.named_parameters())
    for name, info in checkpoint.tensor_infos.items():
        assert np.array_equal(read_tensor(info), parameters[name].detach().numpy()), name


@pytest.mark.parametrize("block", [[24, 48], None], ids=["ragged-blocks", "per-tensor"])
def test_fp8_blocks_that_do_not_tile_and_per_tensor_scales(random_llama, tmp_path, block):
    """Blocks cut short at the weight's edges (DeepSeek's kv_a_proj of 576 rows in blocks of 128), and one scale for
    the whole tensor: each weight is its FP8 value times its own block's scale."""
    from siliconvert.checkpoint import read_tensor

    folder = fp8_source(random_llama, tmp_path / "fp8", block)
    stored = load_file(folder / "model.safetensors")
    checkpoint = Checkpoint.open(folder)
    name = "model.layers.1.mlp.down_proj.weight"  # [32, 64]
    scale = stored[name + "_scale_inv"].reshape(-1, 1) if block is None else stored[name + "_scale_inv"]
    rows, cols = stored[name].shape
    block_rows, block_cols = block or (rows, cols)
    expected = stored[name].float() * scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(
        block_cols, 1)[:, :cols]
    assert np.array_equal(read_tensor(checkpoint.tensor_infos[name]), expected.numpy())


def test_an_fp8_weight_is_dequantized_in_memory_bounded_by_the_tensor(tmp_path):
    """Reading a 2048 × 4096 FP8 weight holds its float32 result, its FP8 bytes (a quarter of that) and a scratch
    of 1 MB: the peak stays under 1.4 × the float32 tensor."""
    import tracemalloc

    from siliconvert.checkpoint import SourceQuantization, pair_fp8_scales, read_safetensors_header, read_tensor

    weight = (torch.randn(2048, 4096) * 0.02).to(torch.float8_e4m3fn)
    save_file({"w.weight": weight, "w.weight_scale_inv": torch.full((16, 32), 0.5)}, tmp_path / "w.safetensors")
    header = read_safetensors_header(tmp_path / "w.safetensors")
    infos = pair_fp8_scales(header, SourceQuantization("fp8", "", (128, 128)), tmp_path)
    tracemalloc.start()
    array = read_tensor(infos["w.weight"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(array, weight.float().numpy() * 0.5)
    assert peak < 1.4 * array.nbytes, f"peak {peak / 2**20:.1f} MiB for a {array.nbytes / 2**20:.0f} MiB tensor"


def test_fp8_without_its_scale_is_refused(random_llama, tmp_path):
    folder = fp8_source(random_llama, tmp_path / "fp8", [16, 16])
    stored = load_file(folder / "model.safetensors")
    del stored["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' \(F8_E4M3 \[64, 32\]\) is FP8 "
                                              "without a scale"):
        Checkpoint.open(folder)


def test_an_mxfp4_source_reads_as_transformers_dequantizes_it(tmp_path):
    """gpt-oss with its experts in MXFP4 as the hub ships them: each blocks/scales pair read as one tensor, equal bit
    for bit to what transformers' own MXFP4 dequantization loads (in bfloat16, widened); the config's quantization
    named for the report, the paired tensors listed."""
    from families import gpt_oss_mxfp4
    from transformers import AutoModelForCausalLM

    from siliconvert.checkpoint import read_model_tensor

    folder = gpt_oss_mxfp4(tmp_path / "mxfp4")
    checkpoint = Checkpoint.open(folder)
    assert checkpoint.quantization.method == "mxfp4" and "MXFP4" in checkpoint.quantization.description
    assert checkpoint.quantization.tensors == tuple(f"model.layers.{layer}.mlp.experts.{stack}" for layer in (0, 1)
                                                    for stack in ("down_proj", "gate_up_proj"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)  # no triton here: dequantized
    state = model.state_dict()
    for name, info in checkpoint.tensor_infos.items():
        assert np.array_equal(read_model_tensor(info), state[name].float().numpy()), name


def test_an_mxfp4_stack_is_dequantized_in_memory_bounded_by_the_tensor(tmp_path):
    """Reading an MXFP4 stack of 4 experts × 1024 rows × 2048 columns holds its float32 result, its bytes (an eighth
    of that) and a bounded scratch: the peak stays under 1.2 × the float32 tensor, in transformers' layout or in the
    stream's (gpt-oss's: transposed, gate and up rows apart, the rows reordered in the bytes)."""
    import tracemalloc
    from dataclasses import replace

    from siliconvert.checkpoint import (
        SourceQuantization,
        pair_mxfp4_blocks,
        read_model_tensor,
        read_safetensors_header,
        read_tensor,
        streamed_layout,
    )

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (4, 1024, 64, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(118, 124, (4, 1024, 64), dtype=torch.uint8, generator=generator)
    save_file({"w_blocks": blocks, "w_scales": scales}, tmp_path / "w.safetensors")
    header = read_safetensors_header(tmp_path / "w.safetensors")
    infos, quantization = pair_mxfp4_blocks(header, SourceQuantization("mxfp4", ""), tmp_path)
    assert quantization.tensors == ("w",) and infos["w"].shape == (4, 2048, 1024)
    streamed = replace(infos["w"], shape=(4, 1024, 2048), layout=("transposed", "interleaved"))  # gpt-oss's gate_up
    for read, info in ((read_model_tensor, infos["w"]), (read_tensor, streamed)):
        tracemalloc.start()
        array = read(info)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1.2 * array.nbytes, f"peak {peak / 2**20:.1f} MiB for a {array.nbytes / 2**20:.0f} MiB tensor"
        assert array.shape == info.shape
    assert np.array_equal(read_tensor(streamed), streamed_layout(read_model_tensor(infos["w"]), streamed.layout))


def test_mxfp4_blocks_without_their_scales_are_refused(tmp_path):
    from siliconvert.checkpoint import SourceQuantization, pair_mxfp4_blocks, read_safetensors_header

    save_file({"w_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8)}, tmp_path / "w.safetensors")
    header = read_safetensors_header(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"'w_blocks' \(U8 \[2, 4, 1, 16\]\) is not MXFP4 blocks"):
        pair_mxfp4_blocks(header, SourceQuantization("mxfp4", ""), tmp_path)


def test_ministral3_as_the_hub_ships_it_converts_its_language_model(tmp_path):
    """Mistral3ForConditionalGeneration around a Ministral 3 text model: its language model, as Ministral3ForCausalLM,
    the Llama 4 attention temperature read from the text config; the Pixtral tower and projector dropped."""
    from families import mistral3_multimodal

    from siliconvert.architectures import ConfigWarning

    path = mistral3_multimodal(tmp_path / "ministral3")
    with pytest.warns(ConfigWarning, match=r"the vision tower and projector \(\d+ tensors\) are dropped"):
        checkpoint = Checkpoint.open(path)
    assert checkpoint.config["architectures"] == ["Ministral3ForCausalLM"]
    assert checkpoint.spec.family == "ministral3" and checkpoint.spec.position_attention_scale == (0.1, 64)
    assert not any("vision" in name or "projector" in name for name in checkpoint.tensor_infos)
