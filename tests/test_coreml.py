"""Core ML target end to end: build the packages from small trained checkpoints, run them back from disk
through the MIL interpreter, and hold them to the transformers reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import reference_logits_for

from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter, model_bytes
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


def build(source: Path, out_dir: Path, tensors=None, **target):
    checkpoint = Checkpoint.open(source)
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT, **target), out_dir, "tiny")
    for name, array in tensors if tensors is not None else checkpoint.tensors():
        writer.add(name, array)
    return writer, writer.finish()


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
    _, (artifact,) = build(source, tmp_path_factory.mktemp(f"coreml-{request.param}"))
    windows = windows_of(source)
    return source, artifact, windows, reference_logits_for(source, windows)


@pytest.fixture(scope="session")
def llama(small_model):
    return small_model("llama", FAMILIES["llama"][0], **FAMILIES["llama"][1])


def test_package_is_a_stateful_ml_program(converted):
    import coremltools as ct

    source, artifact, *_ = converted
    assert (artifact.format, artifact.quant, artifact.runner_options) == ("coreml", "fp16", {"compute_units": "all"})
    assert artifact.path.name == "tiny-fp16-coreml"
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["context_length"] == CONTEXT and manifest["functions"] == {"decode": 1, "prefill": 64}
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
    runner = CoreMLRunner(artifact.path, {})
    assert (runner.runtime, runner.device) == ("mil-interpreter", "CPU (emulated, not Core ML)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    for text in ("def f(x):\n    return x ** 2", " leading space", "ünïcode — and 1234"):
        assert runner.tokenize(text) == tokenizer.encode(text, add_special_tokens=False)
    scores = scores_of(artifact.path, windows, reference)
    assert scores.mean_kld < 0.01 and scores.same_top1 >= 0.95, scores


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
    _, (single,) = build(llama, tmp_path / "single")
    # reversed stream: the last chunk's tensors come first and overflow the one-chunk buffer to disk
    reverse = list(Checkpoint.open(llama).tensors())[::-1]
    writer, (chunked,) = build(llama, tmp_path / "chunked", tensors=reverse, chunks=2)
    assert writer.buffer.spilled > 0
    manifest = json.loads((chunked.path / "manifest.json").read_text())
    assert [(c["first_layer"], c["num_layers"], c["outputs"]) for c in manifest["chunks"]] == [
        (0, 1, ["hidden_states_out"]), (1, 1, ["logits"])]
    window = windows_of(llama, count=1)[0]
    assert np.array_equal(CoreMLRunner(chunked.path, {}).logits(window), CoreMLRunner(single.path, {}).logits(window))


def test_compressed_variants(llama, tmp_path):
    _, artifacts = build(llama, tmp_path, precision=["int4", "int8"])
    assert [a.quant for a in artifacts] == ["fp16", "int4", "int8"]
    fp16, int4, int8 = (a.path for a in artifacts)
    assert weight_bytes(int8) < 0.6 * weight_bytes(fp16) and weight_bytes(int4) < 0.45 * weight_bytes(fp16)
    windows = windows_of(llama, count=2)
    reference = reference_logits_for(llama, windows)
    int8_scores, int4_scores = scores_of(int8, windows, reference), scores_of(int4, windows, reference)
    assert int8_scores.mean_kld < 1e-3, int8_scores
    assert int8_scores.mean_kld < int4_scores.mean_kld < 0.05, int4_scores


# The child reports its own peak RSS as VmHWM: its ru_maxrss would not do, because Linux carries the
# high-water mark across exec, so a child of this (large) pytest process would report pytest's peak.
PEAK_RSS = """
import re, sys
from pathlib import Path
from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.coreml import CoreMLWriter
from siliconvert.recipe import CoreMLTarget
checkpoint = Checkpoint.open(sys.argv[1])
writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=64, chunks=int(sys.argv[2])),
                      Path(sys.argv[3]), "m")
for name, array in checkpoint.tensors():
    writer.add(name, array)
writer.finish()
print(int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_follows_the_chunk_size(small_model, tmp_path):
    source = small_model("llama", "sentencepiece", hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4,
                         intermediate_size=1536, train_steps=1)
    peak = {}
    for chunks in (1, 6):
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(source), str(chunks), str(tmp_path / str(chunks))],
                             capture_output=True, text=True, check=True)
        peak[chunks] = int(run.stdout.split()[-1])
    weights = model_bytes(Checkpoint.open(source).spec)
    print(f"peak RSS: {peak[1] / 2**20:.0f} MiB in one chunk, {peak[6] / 2**20:.0f} MiB in six; "
          f"{weights / 2**20:.0f} MiB of fp16 weights")
    assert peak[1] - peak[6] > weights, peak  # a whole-model build holds several copies, a chunk's build one


def test_writer_refuses_misuse(llama, tmp_path):
    checkpoint = Checkpoint.open(llama)
    with pytest.raises(RecipeError, match="more than"):
        CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", chunks=3), tmp_path, "x")
    writer = CoreMLWriter(checkpoint, CoreMLTarget(format="coreml", context=CONTEXT), tmp_path, "x")
    name, array = next(checkpoint.tensors())
    writer.add(name, array)
    with pytest.raises(CheckpointError, match="arrived twice"):
        writer.add(name, array)
    with pytest.raises(CheckpointError, match="ended before"):
        writer.finish()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        writer.add(name, array)


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
    _, (artifact,) = build(source, tmp_path / "out")
    windows = windows_of(source, count=2)
    reference = reference_logits_for(source, windows)
    scores = scores_of(artifact.path, windows, reference)
    assert scores.mean_kld < 0.01 and scores.same_top1 >= 0.95, scores
