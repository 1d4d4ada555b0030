"""Core ML target end to end: build the packages from small trained checkpoints, run them back from disk
through the MIL interpreter, and hold them to the transformers reference."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import reference_logits_for

from siliconvert.architectures import TensorRole
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter
from siliconvert.convert.coreml.chunks import model_bytes
from siliconvert.errors import ArtifactError, CheckpointError, RecipeError
from siliconvert.recipe import CoreMLTarget
from siliconvert.textdata import heldout_text
from siliconvert.validate.metrics import compare
from siliconvert.validate.runners.coreml import CoreMLRunner

pytestmark = pytest.mark.slow

CONTEXT = 128  # the package's context; prefill blocks of 64
# family → tokenizer and overrides (those test_mlx.py uses, so the cached checkpoints are shared)
FAMILIES = {
    "llama": ("sentencepiece", {"rope_theta": 50000.0}),
    "mistral": ("sentencepiece", {"tie_word_embeddings": False}),
    "qwen2": ("bpe", {"tie_word_embeddings": True}),
}


def build(source: Path, out_dir: Path, **target):
    checkpoint = Checkpoint.open(source)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT, **target), out_dir, "tiny")
    for info, array in checkpoint.tensors():
        writer.add(info, array)
    artifacts = writer.finish()
    figures = writer.figures()  # its threads' time, within the time the stage was active
    assert 0 < figures["write_s"] <= figures["active_s"] and 0 < figures["build_s"] <= figures["active_s"]
    return artifacts


def windows_of(source: Path, count: int = 4, length: int = CONTEXT) -> np.ndarray:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source).encode(heldout_text()[:40000], add_special_tokens=False)
    return np.array([ids[i * length:(i + 1) * length] for i in range(count)])


def scores_of(path: Path, windows: np.ndarray, reference: np.ndarray):
    runner = CoreMLRunner(path, {"compute_units": "all"})
    logits = np.stack([runner.logits(w) for w in windows])
    vocab = reference.shape[-1]
    return compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab),
                   windows[:, 1:].reshape(-1))[0]


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.mlpackage/Data/com.apple.CoreML/weights/weight.bin"))


@pytest.fixture(scope="session", params=list(FAMILIES))
def converted(request, small_model, tmp_path_factory):
    """(source checkpoint, fp16 artifact, held-out windows, reference logits) per family, built once."""
    tokenizer, overrides = FAMILIES[request.param]
    source = small_model(request.param, tokenizer, **overrides)
    (artifact,) = build(source, tmp_path_factory.mktemp(f"coreml-{request.param}"))
    windows = windows_of(source)
    return source, artifact, windows, reference_logits_for(source, windows)


@pytest.fixture(scope="session")
def llama(small_model):
    return small_model("llama", FAMILIES["llama"][0], **FAMILIES["llama"][1])


def test_package_is_a_stateful_ml_program(converted):
    import coremltools as ct

    source, artifact, *_ = converted
    assert (artifact.format, artifact.quant, artifact.runner_options["compute_units"]) == ("coreml", "fp16", "all")
    assert artifact.path.name == "tiny-fp16-coreml"
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["context_length"] == CONTEXT and manifest["functions"] == {"decode": 1, "prefill": 64}
    # the KV cache per sequence at the full context: keys and values, fp16
    kv_bytes = sum(2 * 2 * math.prod(entry["states"]["key_cache"]) for entry in manifest["chunks"])
    assert artifact.runner_options["state_bytes"] == manifest["state_bytes"] == {"kv_cache": kv_bytes}
    for entry in manifest["chunks"]:
        spec = ct.models.MLModel(str(artifact.path / entry["package"]), skip_model_load=True).get_spec()
        assert spec.WhichOneof("Type") == "mlProgram"
        assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: what states need
        functions = {f.name: f for f in spec.description.functions}
        assert set(functions) == {"decode", "prefill"}
        for function in functions.values():
            assert [s.name for s in function.state] == ["key_cache", "value_cache"]
            assert [i.name for i in function.input] == entry["inputs"]
            assert list(function.state[0].type.stateType.arrayType.shape) == entry["states"]["key_cache"]
    # decode and prefill share one copy of the weights
    assert weight_bytes(artifact.path) < 1.1 * model_bytes(Checkpoint.open(source).spec)
    assert (artifact.path / "tokenizer_config.json").is_file()


def test_fp16_logits_match_the_reference(converted):
    source, artifact, windows, reference = converted
    runner = CoreMLRunner(artifact.path, artifact.runner_options)
    assert artifact.runner_options["interpreter"] == "torch"  # the recipe's default
    assert runner.runtime == "mil-interpreter" and runner.device.endswith("(emulated, not Core ML; torch)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    for text in ("def f(x):\n    return x ** 2", " leading space", "ünïcode — and 1234"):
        assert runner.tokenize(text) == tokenizer.encode(text, add_special_tokens=False)
    scores = scores_of(artifact.path, windows, reference)
    assert scores.mean_kld < 0.01 and scores.same_top1 >= 0.95, scores


def test_the_torch_interpreter_agrees_with_the_numpy_reference(converted):
    """The whole package on torch (CUDA where present) and on numpy: the same logits within fp16 rounding, the
    same top token; and the cache stepped through "decode" the same way."""
    _, artifact, windows, _ = converted
    on_torch, on_numpy = (CoreMLRunner(artifact.path, {"interpreter": engine}) for engine in ("torch", "numpy"))
    assert on_numpy.device == "CPU (emulated, not Core ML; numpy)"
    torch_logits, numpy_logits = on_torch.logits_many(windows[:2]), on_numpy.logits_many(windows[:2])
    np.testing.assert_allclose(torch_logits, numpy_logits, atol=0.05)  # logits of a few units: fp16 ulps apart
    assert (torch_logits.argmax(-1) == numpy_logits.argmax(-1)).mean() > 0.99
    prompt, continuation = windows[0][:70], windows[0][70:74]  # past one prefill block, then decode
    np.testing.assert_allclose(on_torch.cached_logits(prompt, continuation),
                               on_numpy.cached_logits(prompt, continuation), atol=0.05)
    with pytest.raises(ArtifactError, match="unknown MIL interpreter 'jax'"):
        CoreMLRunner(artifact.path, {"interpreter": "jax"})


def test_decode_through_the_cache_equals_prefill(converted):
    _, artifact, windows, _ = converted
    runner = CoreMLRunner(artifact.path, {})
    window, prompt = windows[0][:100], 10
    whole = runner.logits(window)
    stepped = np.stack([runner.start(window[:prompt])] + [runner.step(int(t)) for t in window[prompt:-1]])
    expected = whole[prompt - 1:-1]  # the logits after tokens prompt-1 … 98
    assert np.array_equal(stepped.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(stepped, expected, atol=0.05)  # fp16 logits: a few ulps apart
    assert runner.greedy(window[:prompt], 20) == runner.greedy(window[:prompt], 20)


def test_damaged_weights_wreck_the_scores(converted, tmp_path):
    _, artifact, windows, reference = converted
    damaged = tmp_path / "damaged"
    shutil.copytree(artifact.path, damaged)
    weights = damaged / "chunk_01.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    # every blob's values shuffled in place: same bytes, same value distribution, wrong places
    rng = np.random.default_rng(0)
    for start, size in blobs(bytes(data)):
        values = np.frombuffer(data[start:start + size], np.uint16).copy()
        rng.shuffle(values)
        data[start:start + size] = values.tobytes()
    weights.write_bytes(bytes(data))
    assert scores_of(damaged, windows[:1], reference[:1]).mean_kld > 1.0
    weights.write_bytes(bytes(data[:len(data) // 2]))  # truncated: the records say more than is there
    with pytest.raises(ArtifactError, match="damaged"):
        CoreMLRunner(damaged, {})


def blobs(data: bytes) -> list[tuple[int, int]]:
    """(data offset, size) of each blob in a weight.bin, from its 64-byte records (validate/runners/mil)."""
    found, offset = [], 64
    while offset + 64 <= len(data):
        sentinel, _, size, start = np.frombuffer(data[offset:offset + 24], "<u4,<u4,<u8,<u8")[0]
        assert sentinel == 0xDEADBEEF
        found.append((int(start), int(size)))
        offset = (int(start) + int(size) + 63) // 64 * 64
    return found


def test_chunks_split_the_layers_not_the_logits(llama, tmp_path):
    (single,) = build(llama, tmp_path / "single")
    # the stream in name order (how safetensors stores it): the LM head comes first, so the last package is
    # written while the first is
    checkpoint = Checkpoint.open(llama)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT, chunks=2), tmp_path / "chunked",
                          "tiny")
    open_at_once = 0
    for info, array in sorted(checkpoint.tensors(), key=lambda item: item[0].name):
        writer.add(info, array)
        open_at_once = max(open_at_once, len(writer.writing))
    (chunked,) = writer.finish()
    assert open_at_once == 2
    manifest = json.loads((chunked.path / "manifest.json").read_text())
    assert [(c["first_layer"], c["num_layers"], c["outputs"]) for c in manifest["chunks"]] == [
        (0, 1, ["hidden_states_out"]), (1, 1, ["logits"])]
    window = windows_of(llama, count=1)[0]
    assert np.array_equal(CoreMLRunner(chunked.path, {}).logits(window), CoreMLRunner(single.path, {}).logits(window))


def test_same_checkpoint_same_bytes(llama, tmp_path):
    """coremltools alone gives every package random Manifest.json identifiers; this writer gives none."""
    folders = [build(llama, tmp_path / run, chunks=2)[0].path for run in ("a", "b")]
    files = sorted(p.relative_to(folders[0]) for p in folders[0].rglob("*") if p.is_file())
    assert len(files) > 6 and files == sorted(p.relative_to(folders[1]) for p in folders[1].rglob("*") if p.is_file())
    for file in files:
        assert (folders[0] / file).read_bytes() == (folders[1] / file).read_bytes(), file


def test_compressed_variants(llama, tmp_path):
    artifacts = build(llama, tmp_path, precision=["int4", "int8"])
    assert [a.quant for a in artifacts] == ["fp16", "int4", "int8"]
    fp16, int4, int8 = (a.path for a in artifacts)
    assert weight_bytes(int8) < 0.6 * weight_bytes(fp16) and weight_bytes(int4) < 0.45 * weight_bytes(fp16)
    windows = windows_of(llama, count=2)
    reference = reference_logits_for(llama, windows)
    int8_scores, int4_scores = scores_of(int8, windows, reference), scores_of(int4, windows, reference)
    assert int8_scores.mean_kld < 1e-3, int8_scores
    assert int8_scores.mean_kld < int4_scores.mean_kld < 0.05, int4_scores


def test_w8a8_opens_in_coremltools_and_scores_near_int8(llama, tmp_path):
    """A W8A8 package: int8's weights, and before every compressed linear layer (not the router-free llama's
    embedding lookup) an int8 quantize / dequantize pair at one fp16 scale; it opens with coremltools' loader, holds
    int8's bytes, and its activations' rounding costs a mean KLD above int8's but within a sane bound."""
    import coremltools as ct

    artifacts = {a.quant: a.path for a in build(llama, tmp_path, precision=["int8", "w8a8"])}
    assert list(artifacts) == ["fp16", "int8", "w8a8"] and artifacts["w8a8"].name == "tiny-w8a8-coreml"
    for package in sorted(artifacts["w8a8"].glob("*.mlpackage")):
        program = ct.models.MLModel(str(package), skip_model_load=True).get_spec().mlProgram
        for function in program.functions.values():
            ops = [op for block in function.block_specializations.values() for op in block.operations]
            linear = [op for op in ops if op.type == "conv"]
            quantized = {op.outputs[0].name for op in ops if op.type == "quantize"}
            dequantized = {op.outputs[0].name: op for op in ops if op.type == "dequantize"}
            assert len(linear) == len(quantized) == len(dequantized) > 0, package.name
            for op in dequantized.values():
                assert op.inputs["input"].arguments[0].name in quantized
            assert all(op.inputs["x"].arguments[0].name in dequantized for op in linear), package.name
    assert weight_bytes(artifacts["w8a8"]) == weight_bytes(artifacts["int8"])
    windows = windows_of(llama, count=2)
    reference = reference_logits_for(llama, windows)
    scores = {p: scores_of(artifacts[p], windows, reference) for p in ("int8", "w8a8")}
    print({p: (s.mean_kld, s.same_top1) for p, s in scores.items()})
    assert scores["int8"].mean_kld < scores["w8a8"].mean_kld < 0.01 and scores["w8a8"].same_top1 > 0.95, scores
    # the numpy interpreter (the reference) runs it as torch does: an fp16 input an ulp apart may land on the other
    # side of a rounding step, so the logits agree within a few of those steps, the top tokens nearly everywhere
    on_torch, on_numpy = (CoreMLRunner(artifacts["w8a8"], {"interpreter": engine}) for engine in ("torch", "numpy"))
    torch_logits, numpy_logits = on_torch.logits_many(windows[:1]), on_numpy.logits_many(windows[:1])
    np.testing.assert_allclose(torch_logits, numpy_logits, atol=0.25)
    assert (torch_logits.argmax(-1) == numpy_logits.argmax(-1)).mean() > 0.98


def test_a_broken_activation_scale_fails_the_gate(llama, tmp_path, monkeypatch):
    """The validation sees what the activation scales do: a W8A8 package whose scales are 1/64 of the calibrated
    ones (most activations saturate at ±127) fails `siliconvert validate`'s default gates, naming the KLD, where
    the package built with the calibrated scales passes them."""
    from conftest import SILICONVERT

    from siliconvert.convert.coreml import writer as writer_module
    from siliconvert.quantize.coreml import activation_scale

    (_, calibrated) = build(llama, tmp_path / "calibrated", precision=["w8a8"])
    monkeypatch.setattr(writer_module, "activation_scale", lambda peak: activation_scale(peak / 64))
    (_, broken) = build(llama, tmp_path / "broken", precision=["w8a8"])

    def validate(artifact) -> subprocess.CompletedProcess:
        return subprocess.run([SILICONVERT, "validate", str(artifact.path), "--source", str(llama), "--output",
                               str(tmp_path / f"report-{artifact.path.parent.name}"), "--tokens", "256", "--context",
                               "128", "--no-latency"], capture_output=True, text=True)

    passed, failed = validate(calibrated), validate(broken)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert failed.returncode == 1 and "coreml w8a8: mean_kld" in failed.stderr, failed.stdout + failed.stderr


def test_palettized_variants(llama, tmp_path):
    """Every palette width and an int8-table palette: each package opens with coremltools' loader, holds the ops
    the palettization and joint-compression passes make, runs in the MIL interpreter, and its mean KLD falls as its
    bits rise (so do its bytes)."""
    import coremltools as ct

    palettes = ["pal2", "pal3", "pal4", "pal4-lut8", "pal6", "pal8"]
    artifacts = {a.quant: a.path for a in build(llama, tmp_path, precision=palettes)}
    assert list(artifacts) == ["fp16", *palettes]
    for precision in palettes:
        for package in sorted(artifacts[precision].glob("*.mlpackage")):
            program = ct.models.MLModel(str(package), skip_model_load=True).get_spec().mlProgram
            ops = {op.type for function in program.functions.values()
                   for block in function.block_specializations.values() for op in block.operations}
            assert "constexpr_lut_to_dense" in ops, (precision, package.name)
            assert ("constexpr_blockwise_shift_scale" in ops) == precision.endswith("-lut8"), (precision, ops)
    windows = windows_of(llama, count=2)
    reference = reference_logits_for(llama, windows)
    kld = {p: scores_of(artifacts[p], windows, reference).mean_kld for p in palettes}
    print({p: (kld[p], weight_bytes(artifacts[p])) for p in palettes})
    assert kld["pal2"] > kld["pal3"] > kld["pal4"] > kld["pal6"] > kld["pal8"], kld
    assert kld["pal4-lut8"] < 1.5 * kld["pal4"] and kld["pal8"] < 1e-3, kld
    sizes = [weight_bytes(artifacts[p]) for p in ["pal2", "pal3", "pal4-lut8", "pal4", "pal6", "pal8"]]
    assert sizes == sorted(sizes) and sizes[-1] < weight_bytes(artifacts["fp16"]), sizes


def test_gptq_variants_open_and_beat_rounding(llama, tmp_path):
    """`method: gptq`: int4 and a palette rounded a column at a time against the calibration inputs' second moments,
    named as such, in the same ops and bytes as rounding's; each opens with coremltools' loader, runs in the MIL
    interpreter and scores a lower mean KLD than the same precision rounded."""
    import coremltools as ct

    precisions = ["int4", "pal3"]
    rounded = {a.quant: a.path for a in build(llama, tmp_path / "rtn", precision=precisions)}
    compensated = {a.quant: a.path for a in build(llama, tmp_path / "gptq", precision=precisions, method="gptq")}
    assert list(compensated) == ["fp16", "int4-gptq", "pal3-gptq"]
    windows = windows_of(llama, count=2)
    reference = reference_logits_for(llama, windows)
    for precision in precisions:
        ours = compensated[f"{precision}-gptq"]
        assert json.loads((ours / "manifest.json").read_text())["precision"] == f"{precision}-gptq"
        assert weight_bytes(ours) == weight_bytes(rounded[precision])
        for package in sorted(ours.glob("*.mlpackage")):
            ct.models.MLModel(str(package), skip_model_load=True)
        kld = {method: scores_of(path, windows, reference).mean_kld
               for method, path in (("rtn", rounded[precision]), ("gptq", ours))}
        print(precision, kld)
        assert kld["gptq"] < 0.8 * kld["rtn"], (precision, kld)


# The child resets and reads its own peak RSS (VmHWM): its ru_maxrss would not do, because Linux carries the
# high-water mark across exec, so a child of this (large) pytest process would report pytest's peak. wchar
# counts the bytes it hands to write(2).
STREAM = """
import re, sys
from pathlib import Path
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter, package
from siliconvert.recipe import CoreMLTarget
def count(file, field):
    return int(re.search(field + r":\\s*(\\d+)", Path(file).read_text())[1])
checkpoint = Checkpoint.open(sys.argv[1])
writer = None
package.WRITE_BLOCK_VALUES = 1 << 20  # 2 MB blocks: the blocks in flight stay well below the package's size
if len(sys.argv) > 2:
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=64), Path(sys.argv[2]), "m")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
written = count("/proc/self/io", "wchar")
for info, array in checkpoint.tensors():
    if writer is not None:
        writer.add(info, array)
    del array
if writer is not None:
    writer.finish()
print(count("/proc/self/status", "VmHWM") * 1024, count("/proc/self/io", "wchar") - written)
"""


@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory) -> Path:
    """A random Llama whose one `chunks: auto` package holds ~130 MB of fp16 weights, the largest tensor 17 MB."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("wide-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(4096)}, unk_token="w0")).save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads VmHWM and wchar from /proc (Linux)")
def test_writer_holds_a_tensor_and_writes_each_byte_once(wide_llama, tmp_path):
    """Against the same stream read with no writer: the writer's own peak stays far below its package's weights
    (they go to weight.bin a block at a time), and it writes the package's bytes once."""
    runs = {}
    for label, args in (("stream", []), ("writer", [str(tmp_path)])):
        run = subprocess.run([sys.executable, "-c", STREAM, str(wide_llama), *args], capture_output=True, text=True,
                             check=True)
        runs[label] = [int(v) for v in run.stdout.split()[-2:]]
    (peak_stream, _), (peak_writer, written) = runs["stream"], runs["writer"]
    package_bytes = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    spec = Checkpoint.open(wide_llama).spec
    weights, largest = model_bytes(spec), 2 * spec.intermediate_size * spec.hidden_size
    print(f"writer: +{(peak_writer - peak_stream) / 2**20:.0f} MiB over the stream alone for a package of "
          f"{weights / 2**20:.0f} MiB of weights (largest tensor {largest / 2**20:.0f} MiB); wrote "
          f"{written / package_bytes:.3f}× the package's {package_bytes / 2**20:.0f} MiB")
    assert peak_writer - peak_stream < weights / 4
    assert written < 1.02 * package_bytes


def test_writer_refuses_misuse(llama, tmp_path):
    checkpoint = Checkpoint.open(llama)
    with pytest.raises(RecipeError, match="more than"):
        CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", chunks=3), tmp_path, "x")
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT), tmp_path, "x")
    info, array = next(checkpoint.tensors())
    writer.add(info, array)
    with pytest.raises(CheckpointError, match="arrived twice"):
        writer.add(info, array)
    other, _ = next(item for item in checkpoint.tensors() if item[0].name != info.name)
    with pytest.raises(CheckpointError, match="has shape"):
        writer.add(other, array.ravel()[:7])
    router = dataclasses.replace(other, role=TensorRole("ffn_gate_inp", 0, "weight"))  # a dense model has none
    with pytest.raises(CheckpointError, match="used by no Core ML package"):
        writer.add(router, array)
    with pytest.raises(CheckpointError, match="ended before"):
        writer.finish()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        writer.add(info, array)


def test_a_failed_build_stops_the_pass_and_leaves_nothing(llama, tmp_path, monkeypatch):
    """Packages are built on the writer's own thread: its error must reach the stream, and abort must wait for
    it and remove every work folder."""
    from siliconvert.convert.coreml import writer as coreml_writer

    def broken(*_args, **_kwargs):
        raise RuntimeError("graph failed")

    monkeypatch.setattr(coreml_writer, "build_program", broken)
    checkpoint = Checkpoint.open(llama)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT, chunks=2), tmp_path, "x")
    with pytest.raises(RuntimeError, match="graph failed"):
        for info, array in checkpoint.tensors():
            writer.add(info, array)
        writer.finish()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_runner_refuses_misuse(converted):
    _, artifact, windows, _ = converted
    with pytest.raises(ArtifactError, match="option"):
        CoreMLRunner(artifact.path, {"threads": 2})
    runner = CoreMLRunner(artifact.path, {})
    with pytest.raises(RuntimeError, match="before start"):
        runner.step(1)
    with pytest.raises(ArtifactError, match="does not fit"):
        runner.logits(np.concatenate([windows[0], windows[1][:1]]))
    runner.start(windows[0][:-1])
    runner.step(int(windows[0][-1]))
    with pytest.raises(ArtifactError, match="full"):
        runner.step(1)


def test_sliding_window_is_masked_like_transformers(small_model, tmp_path):
    """Mistral v0.1 attends to the last `sliding_window` tokens only; the mask must say so."""
    source = tmp_path / "windowed"
    shutil.copytree(small_model("mistral", *FAMILIES["mistral"][:1], **FAMILIES["mistral"][1]), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"sliding_window": 24}))
    (artifact,) = build(source, tmp_path / "out")
    windows = windows_of(source, count=2)
    reference = reference_logits_for(source, windows)
    scores = scores_of(artifact.path, windows, reference)
    assert scores.mean_kld < 0.01 and scores.same_top1 >= 0.95, scores
