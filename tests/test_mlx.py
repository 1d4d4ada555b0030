"""MLX target: the folder mlx_lm.load opens, the bytes mlx-lm itself would write, the right function."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import build_mlx, reference_logits_for

from siliconvert.checkpoint import Checkpoint
from siliconvert.convert.mlx import MLXWriter
from siliconvert.recipe import MLXTarget
from siliconvert.textdata import heldout_text
from siliconvert.validate.metrics import compare

pytestmark = pytest.mark.slow


def mlx_logits(path, windows):
    from mlx_lm import load

    model, _ = load(str(path))
    return np.stack([np.array(model(mx.array(w)[None])[0].astype(mx.float32)) for w in windows])


def held_out_windows(source, count=2, length=96):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source).encode(heldout_text(), add_special_tokens=False)
    return np.array([ids[i * length:(i + 1) * length] for i in range(count)])


@pytest.fixture(scope="module")
def llama(small_model):
    return small_model("llama", "sentencepiece", rope_theta=50000.0)


def test_quantized_weights_are_mlx_lms_own(llama, tmp_path):
    """Streaming tensor by tensor must give the very bytes mlx_lm.convert writes (in its float type: the source's
    bfloat16, where siliconvert would take float16 by the calibration)."""
    from mlx_lm.convert import convert

    ours = build_mlx(llama, tmp_path / "ours", dtype="bfloat16").path
    convert(str(llama), str(tmp_path / "mlx_lm"), quantize=True, q_group_size=64, q_bits=4)
    theirs = {}
    for shard in (tmp_path / "mlx_lm").glob("model*.safetensors"):
        theirs |= mx.load(str(shard))
    mine = {}
    for shard in ours.glob("model*.safetensors"):
        mine |= mx.load(str(shard))
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert mine[name].dtype == theirs[name].dtype, name
        assert np.array_equal(np.array(mine[name].view(mx.uint8)), np.array(theirs[name].view(mx.uint8))), name
    config = json.loads((ours / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_transformers5_rope_theta_reaches_mlx(llama, tmp_path):
    """θ sits under rope_parameters; mlx-lm alone would run with θ = 10000 and drift."""
    assert "rope_theta" not in json.loads((llama / "config.json").read_text())
    windows = held_out_windows(llama)
    reference = reference_logits_for(llama, windows)
    targets = windows[:, 1:].reshape(-1)

    def kld(logits):
        vocab = reference.shape[-1]
        return compare(reference[:, :-1].reshape(-1, vocab), logits[:, :-1].reshape(-1, vocab), targets)[0]

    ours = build_mlx(llama, tmp_path / "ours", bits=8)
    assert json.loads((ours.path / "config.json").read_text())["rope_theta"] == 50000.0
    ours_scores = kld(mlx_logits(ours.path, windows))
    assert ours_scores.mean_kld < 0.03, ours_scores

    # The failure siliconvert guards against: the same weights with mlx-lm reading the raw config.
    naive = tmp_path / "naive"
    shutil.copytree(ours.path, naive)
    config = json.loads((naive / "config.json").read_text())
    del config["rope_theta"]
    (naive / "config.json").write_text(json.dumps(config))
    naive_scores = kld(mlx_logits(naive, windows))
    assert naive_scores.mean_kld > 5 * ours_scores.mean_kld, (naive_scores, ours_scores)


@pytest.mark.parametrize(("family", "tokenizer"), [("qwen2", "bpe"), ("mistral", "sentencepiece")])
def test_other_families_compute_the_source_function(small_model, tmp_path, family, tokenizer):
    source = small_model(family, tokenizer, tie_word_embeddings=family == "qwen2")
    windows = held_out_windows(source)
    reference = reference_logits_for(source, windows)
    artifact = build_mlx(source, tmp_path, bits=16)
    vocab = reference.shape[-1]
    scores, _ = compare(reference[:, :-1].reshape(-1, vocab),
                        mlx_logits(artifact.path, windows)[:, :-1].reshape(-1, vocab), windows[:, 1:].reshape(-1))
    assert scores.mean_kld < 0.01 and scores.same_top1 > 0.95, scores


def test_writer_leaves_nothing_on_abort(llama, tmp_path):
    checkpoint = Checkpoint.open(llama)
    writer = MLXWriter(checkpoint, MLXTarget(format="mlx"), tmp_path, "x")
    info, array = next(checkpoint.tensors())
    writer.add(info, array)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_shards_and_row_blocks_change_nothing_but_the_files(llama, tmp_path, monkeypatch):
    """Headers written before the data, shards cut by size, tensors converted a few rows at a time: the
    arrays are those of the one-shard, whole-tensor write, and mlx_lm.load opens the folder."""
    from mlx_lm import load

    import siliconvert.convert.mlx as convert_mlx

    whole = build_mlx(llama, tmp_path / "whole").path
    monkeypatch.setattr(convert_mlx, "SHARD_BYTES", 64 << 10)
    monkeypatch.setattr(convert_mlx, "ROW_BLOCK_BYTES", 4 << 10)
    sharded = build_mlx(llama, tmp_path / "sharded").path
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    mine = {}
    for shard in shards:
        arrays = mx.load(str(shard))
        assert all(index["weight_map"][name] == shard.name for name in arrays)
        mine |= arrays
    theirs = mx.load(str(whole / "model.safetensors"))
    assert mine.keys() == theirs.keys() == index["weight_map"].keys()
    for name in theirs:
        assert np.array_equal(np.array(mine[name].view(mx.uint8)), np.array(theirs[name].view(mx.uint8))), name
    load(str(sharded))
