"""The reference, streamed one decoder layer at a time, gives the whole-model reference's logits."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import reference_logits_for

from siliconvert.checkpoint import Checkpoint
from siliconvert.corpus import Windows
from siliconvert.streamed import CheckpointWeights, streamed_logits
from siliconvert.textdata import heldout_text
from siliconvert.validate.reference import reference_logits

pytestmark = pytest.mark.slow

# family → tokenizer and overrides (those test_mlx.py and test_coreml.py use, so cached checkpoints are shared)
FAMILIES = {
    "llama": ("sentencepiece", {"rope_theta": 50000.0}),
    "mistral": ("sentencepiece", {"tie_word_embeddings": False}),
    "qwen2": ("bpe", {"tie_word_embeddings": True}),  # qwen2: q/k/v biases, and here a tied head
}
LENGTH = 64
SLIDING_WINDOW = 16  # shorter than a window, so that the mask matters


def windows_of(source, count: int = 3, length: int = LENGTH) -> Windows:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source).encode(heldout_text()[:20000], add_special_tokens=False)
    tokens = np.array([ids[i * length:(i + 1) * length] for i in range(count)], dtype=np.int64)
    return Windows(tokens, "held-out", hashlib.sha256(tokens.tobytes()).hexdigest()[:16], heldout_text()[:200])


@pytest.fixture(scope="module", params=list(FAMILIES))
def source(request, small_model, tmp_path_factory):
    tokenizer, overrides = FAMILIES[request.param]
    path = small_model(request.param, tokenizer, **overrides)
    if request.param == "mistral":  # Mistral v0.1 attends to the last `sliding_window` tokens only
        windowed = tmp_path_factory.mktemp("windowed") / path.name
        shutil.copytree(path, windowed)
        config = json.loads((windowed / "config.json").read_text())
        (windowed / "config.json").write_text(json.dumps(config | {"sliding_window": SLIDING_WINDOW}))
        return windowed
    return path


def test_streamed_reference_is_the_whole_model_reference(source, tmp_path):
    windows = windows_of(source)
    logits, info = reference_logits(Checkpoint.open(source), windows, tmp_path)
    whole = reference_logits_for(source, windows.tokens)
    assert logits.shape == whole.shape
    assert np.abs(logits - whole).max() < 1e-4
    assert info["dtype"].startswith("float32") and info["cached"] is False
    assert info["peak_rss_mb"] > 0 and info["wall_s"] > 0
    again, cached_info = reference_logits(Checkpoint.open(source), windows, tmp_path)
    assert np.array_equal(again, logits) and cached_info["cached"] is True


def test_sliding_window_mask_reaches_the_layers(small_model):
    """Without the window the logits differ: the Mistral comparison above does test the mask."""
    from transformers import AutoConfig

    tokenizer, overrides = FAMILIES["mistral"]
    path = small_model("mistral", tokenizer, **overrides)
    windows = windows_of(path, count=1).tokens
    full_config = AutoConfig.from_pretrained(path)
    windowed_config = AutoConfig.from_pretrained(path, sliding_window=SLIDING_WINDOW)
    weights = CheckpointWeights(Checkpoint.open(path))
    full, windowed = (streamed_logits(config, weights, windows, device="cpu", dtype=torch.float32, label="test")
                      for config in (full_config, windowed_config))
    assert np.abs(full[:, :SLIDING_WINDOW] - windowed[:, :SLIDING_WINDOW]).max() < 1e-4
    assert np.abs(full[:, SLIDING_WINDOW + 1:] - windowed[:, SLIDING_WINDOW + 1:]).max() > 1e-2


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "gemma3_text", "olmo2", "olmo3", "granite", "phi3",
                                        "smollm3", "lfm2", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next",
                                        "granitemoehybrid", "ministral3", "gemma4_text"])
def test_streamed_reference_runs_each_familys_own_code(model_type):
    """Per-layer masks and rope, Gemma's embedding scale buffer, soft-capped and scaled logits: all of the
    family's forward, layer by layer, equals its whole forward."""
    from families import FAMILY_CASES

    from siliconvert.demo import small_checkpoint

    tokenizer, config = FAMILY_CASES[model_type]
    path = small_checkpoint(None, model_type, tokenizer, config=config)
    windows = windows_of(path, count=2)
    from transformers import AutoConfig

    streamed = streamed_logits(AutoConfig.from_pretrained(path), CheckpointWeights(Checkpoint.open(path)),
                               windows.tokens, device="cpu", dtype=torch.float32, label="test")
    assert np.abs(streamed - reference_logits_for(path, windows.tokens)).max() < 1e-4


def test_a_float16_reference_that_overflows_runs_again_in_float32(random_llama, tmp_path, monkeypatch):
    """Embeddings past 65 504 make float16 hidden states inf: the reference says so and runs in float32."""
    from safetensors.torch import load_file, save_file

    import siliconvert.validate.reference as reference

    source = tmp_path / "huge"
    shutil.copytree(random_llama, source)
    weights = load_file(source / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 1e7  # ~1e5: bf16 holds it
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(reference, "reference_device", lambda: ("cpu", "float16", "CPU (test)"))
    tokens = np.arange(24).reshape(2, 12) % 96
    windows = Windows(tokens, "test", hashlib.sha256(tokens.tobytes()).hexdigest()[:16], "")
    # the child process is spawned: it imports reference afresh, so run the child's function here
    reference._child(Checkpoint.open(source), windows.tokens, tmp_path / "cache")
    info = json.loads((tmp_path / "cache" / "info.json").read_text())
    assert info["dtype"].startswith("float32") and "float16 overflowed in decoder layer 0" in info["dtype"]
    assert np.isfinite(np.load(tmp_path / "cache" / "logits.npy")).all()


def test_hybrid_reference_names_its_torch_path_and_keeps_the_kernel_advice_quiet(tmp_path, capfd):
    """LFM2's convolution runs on transformers' PyTorch path here (no causal-conv1d, no CUDA): the reference's
    description says so, and transformers' note about it, meant for model authors, never reaches the terminal."""
    from families import FAMILY_CASES

    from siliconvert.demo import small_checkpoint
    from siliconvert.streamed import torch_path_kernels
    from siliconvert.validate.reference import _child

    tokenizer, config = FAMILY_CASES["lfm2"]
    path = small_checkpoint(None, "lfm2", tokenizer, config=config)
    capfd.readouterr()
    _child(Checkpoint.open(path), np.arange(16).reshape(1, 16), tmp_path / "cache")
    info = json.loads((tmp_path / "cache" / "info.json").read_text())
    assert info["without_kernels"] == ["causal-conv1d"]
    assert "falling back" not in "".join(capfd.readouterr())
    assert torch_path_kernels(["attention"], "cpu") == []
    assert torch_path_kernels(["gated_delta"], "cpu") == ["causal-conv1d", "flash-linear-attention"]


def test_the_reference_in_the_calibrations_pass_is_its_own_bit_for_bit_and_each_layer_is_read_once(
        random_llama, tmp_path, monkeypatch):
    """A run that calibrates and validates makes the reference logits in the calibration's forward: the same logits
    and the same calibration as two passes of their own, from one read of each weight, in the cache validation
    reads."""
    from siliconvert.calibration import _forward
    from siliconvert.validate.reference import ReferenceForward, _child, reference_forward

    checkpoint = Checkpoint.open(random_llama)
    rng = np.random.default_rng(0)
    range_window, importance_windows = rng.integers(0, 96, size=64), rng.integers(0, 96, size=(2, 32))
    tokens = rng.integers(0, 96, size=(2, 16))
    windows = Windows(tokens, "test", hashlib.sha256(tokens.tobytes()).hexdigest()[:16], "")
    read: list[str] = []
    own_read = CheckpointWeights.tensor
    monkeypatch.setattr(CheckpointWeights, "tensor", lambda self, name: read.append(name) or own_read(self, name))

    # the child processes are spawned: run their functions here
    alone = _forward(checkpoint, "test", range_window, importance_windows, hessian=True)
    _child(checkpoint, tokens, tmp_path / "alone")
    assert len(read) == 2 * len(checkpoint.tensor_infos)
    read.clear()
    alongside = reference_forward(checkpoint, windows, tmp_path / "shared")
    assert isinstance(alongside, ReferenceForward)
    shared = _forward(checkpoint, "test", range_window, importance_windows, hessian=True, alongside=alongside)
    assert sorted(read) == sorted(checkpoint.tensor_infos)  # every weight once, for both

    logits, info = reference_logits(checkpoint, windows, tmp_path / "shared")
    assert info["cached"] is True and "in the calibration's pass" in info["method"]
    assert np.array_equal(logits, np.load(tmp_path / "alone" / "logits.npy"))
    assert reference_forward(checkpoint, windows, tmp_path / "shared") is None  # cached: nothing left to run
    assert (shared.stream_peak, shared.range_tokens, shared.importance_tokens) == (
        alone.stream_peak, alone.range_tokens, alone.importance_tokens)
    for table in ("importance", "hessians"):
        ours, theirs = getattr(shared, table), getattr(alone, table)
        assert sorted(ours) == sorted(theirs)
        assert all(np.array_equal(ours[name], theirs[name]) for name in ours), table
