"""The locally trained checkpoints: standard HF layout, faithful tokenizers, real learning, reproducible bytes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from siliconvert.demo import build_checkpoint, heldout_loss, small_checkpoint
from siliconvert.textdata import heldout_text, training_text

# Tiny enough to build in a few seconds; θ differs from every family's default so a lost θ shows.
TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 192,
    "rope_theta": 25000.0,
    "train_steps": 60,
}
CASES = [("llama", "sentencepiece"), ("qwen2", "bpe"), ("mistral", "sentencepiece")]
SHARDED = "mistral"  # this case is saved in several shards
SAMPLES = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "def f(x):\n    return x ** 2  # square\n",
    "line one\nline two\n\n\nafter blank lines",
    "naïve café — “quoted” ß 中文",
    "emoji 🙂👍🏽",
    "3.14159 + 2e10 == 0x1F",
    "tabs\tand  double  spaces  ",
    "",
]


def build(cache: Path, family: str, tokenizer: str) -> Path:
    shards = {"max_shard_size": "100KB"} if family == SHARDED else {}
    return small_checkpoint(cache, family, tokenizer, **TINY, **shards)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("siliconvert-cache")


@pytest.fixture(scope="session", params=CASES, ids=["-".join(case) for case in CASES])
def case(request: pytest.FixtureRequest, cache: Path) -> tuple[str, str, Path]:
    family, tokenizer = request.param
    return family, tokenizer, build(cache, family, tokenizer)


def sha256s(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_heldout_text_is_never_trained_on():
    paragraphs = [p for p in heldout_text().split("\n\n") if len(p) > 40]
    assert len(paragraphs) > 100 and len(training_text()) > 10 * len(heldout_text())
    assert not [p for p in paragraphs if p in training_text()]


def test_loads_as_a_standard_checkpoint(case):
    family, _, path = case
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family
    assert config["rope_parameters"]["rope_theta"] == TINY["rope_theta"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["dtype"] == "bfloat16"
    assert (path / "generation_config.json").exists()
    index = path / "model.safetensors.index.json"
    if family == SHARDED:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        assert len(shards) > 1 and all((path / shard).exists() for shard in shards)
    else:
        assert (path / "model.safetensors").exists() and not index.exists()

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == family
    assert model.config.rope_parameters["rope_theta"] == TINY["rope_theta"]
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        logits = model(**tokenizer("The for statement", return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_hf_tokenizer_matches_the_raw_one(case):
    _, tokenizer_kind, path = case
    hf = AutoTokenizer.from_pretrained(path)
    if tokenizer_kind == "sentencepiece":
        raw = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).encode
        assert hf("x").input_ids[0] == hf.bos_token_id == 1  # Llama style: BOS first
    else:
        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        raw = lambda text: backend.encode(text, add_special_tokens=False).ids  # noqa: E731
        assert hf.bos_token_id is None and hf.convert_ids_to_tokens(hf.eos_token_id) == "<|endoftext|>"
    for text in SAMPLES:
        ids = hf(text, add_special_tokens=False).input_ids
        assert ids == raw(text), text
        assert hf.decode(ids) == text


def test_training_learned_something(case):
    _, _, path = case
    assert heldout_loss(path) < math.log(TINY["vocab_size"]) - 1.5


@pytest.mark.parametrize("family,tokenizer", CASES[:2])
def test_rebuild_is_byte_identical(family, tokenizer, cache, tmp_path):
    threads = torch.get_num_threads()
    first, again = build(cache, family, tokenizer), build(tmp_path, family, tokenizer)
    assert again != first and sha256s(again) == sha256s(first)
    assert torch.get_num_threads() == threads


def test_existing_checkpoint_is_reused_and_no_temporary_folder_remains(cache):
    path = build(cache, "llama", "sentencepiece")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build(cache, "llama", "sentencepiece") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p.name for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_qwen2_needs_a_byte_level_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="bpe"):
        build_checkpoint(tmp_path / "x", family="qwen2", tokenizer="sentencepiece")
    assert not list(tmp_path.iterdir())
