"""Small checkpoints trained on this machine, for demos and tests (no model hub needed).

`build_checkpoint` trains a tokenizer and a few-million-parameter decoder on the Python documentation
(`textdata.training_text`) and saves both the standard Hugging Face way, so every converter sees what it
would see from the hub: config.json (rope θ under `rope_parameters`), bfloat16 safetensors (sharded on
request), generation_config.json and tokenizer files. Builds are deterministic and cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
)

from siliconvert.artifacts import cache_root
from siliconvert.progress import track
from siliconvert.textdata import heldout_text, training_text

DEMO_VERSION = "2"  # bump whenever the recipe below changes: it names the cache folder

# transformers model_type of each family a checkpoint can be built for
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "granite", "phi3", "smollm3",
            "qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "olmo3", "lfm2", "qwen3_5_text",
            "qwen3_5_moe_text", "qwen3_next", "granitemoehybrid",
            "ministral3", "gemma4_text", "gpt_oss")
# transformers loads their tokenizers as byte-level Qwen2Tokenizer
BYTE_LEVEL_ONLY = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")
TOKENIZERS = ("sentencepiece", "bpe")
QWEN2_SPLIT = (  # Qwen2's pre-tokenizer regex: the one Qwen2Tokenizer rebuilds on load
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Windows as long as the validation context (recipes use 256), so every position a score reads was trained.
SEQ_LEN, BATCH_SIZE, LEARNING_RATE = 256, 8, 3e-3


def sentencepiece_tokenizer(folder: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a Llama-style SentencePiece BPE model, save it as folder/tokenizer.model, return its HF twin."""
    lines = [line for line in training_text().splitlines() if line.strip()]
    model_file = folder / "tokenizer.model"
    with model_file.open("wb") as out:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            # Llama's settings: raw text (no NFKC), kept whitespace runs (code indentation), one token a digit
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, num_threads=1, minloglevel=2,
        )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # SentencePiece BPE merges the adjacent pair whose union scores highest, and pieces are sorted by score:
    # listing every (left, right) split of every piece in id order gives `tokenizers` the same merge ranks.
    merges = [
        (piece[:cut], piece[cut:])
        for i, piece in enumerate(pieces)
        if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i))
        for cut in range(1, len(piece))
        if piece[:cut] in vocab and piece[cut:] in vocab
    ]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Always prepend "▁" like SentencePiece's dummy prefix. (transformers 5's LlamaTokenizer uses a Metaspace
    # pre-tokenizer instead, which skips the prefix when the text starts with a space: other ids than sp.)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in pieces[:3]])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True
    )


def byte_bpe_tokenizer(vocab_size: int) -> Qwen2Tokenizer:
    """Train a GPT-2/Qwen2-style byte-level BPE (special tokens last, as in Qwen2) and wrap it for transformers."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_text().split("\n\n"), trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"]) | {token: len(model["vocab"]) + i for i, token in enumerate(BPE_SPECIALS)}
    return Qwen2Tokenizer(
        vocab=vocab, merges=[tuple(m) for m in model["merges"]], extra_special_tokens=list(BPE_SPECIALS[1:])
    )


def build_checkpoint(
    out_dir: Path,
    *,
    family: str = "mistral",
    tokenizer: str = "sentencepiece",
    vocab_size: int = 4096,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    intermediate_size: int = 768,
    rope_theta: float = 50000.0,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    train_steps: int = 200,  # about 100 s on two cores at the default size
    seed: int = 0,
    threads: int = 2,
    max_shard_size: str | None = None,
    dtype: str = "bfloat16",
    config: dict | None = None,
) -> Path:
    """Train a tokenizer and a `family` decoder, save them as a Hugging Face checkpoint in `out_dir`.

    `vocab_size` is the tokenizer's size, special tokens included, and config.json's (no padding).
    `threads` is part of the recipe: float sums depend on it, so another count gives other weights.
    `config` sets further keys of the family's transformers config (its traits: head_dim, soft-caps, ...).
    An existing `out_dir` is returned as is. The build happens in a sibling folder renamed at the end,
    so an interrupted build never leaves a half-written checkpoint behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        return out_dir
    if family not in FAMILIES or tokenizer not in TOKENIZERS:
        raise ValueError(f"family must be one of {FAMILIES} and tokenizer one of {TOKENIZERS}")
    if family in BYTE_LEVEL_ONLY and tokenizer != "bpe":
        raise ValueError(f"transformers loads any {family} tokenizer as a byte-level Qwen2Tokenizer: use "
                         "tokenizer='bpe'")
    work = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        hf_tokenizer = (
            sentencepiece_tokenizer(work, vocab_size)
            if tokenizer == "sentencepiece"
            else byte_bpe_tokenizer(vocab_size)
        )
        eos_id = hf_tokenizer.eos_token_id
        settings = {
            "vocab_size": len(hf_tokenizer),
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "intermediate_size": intermediate_size,
            "max_position_embeddings": max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "tie_word_embeddings": tie_word_embeddings,
            # Qwen2 has no BOS token and names <|endoftext|> as both bos and eos in its config
            "bos_token_id": eos_id if hf_tokenizer.bos_token_id is None else hf_tokenizer.bos_token_id,
            "eos_token_id": eos_id,
            "pad_token_id": hf_tokenizer.pad_token_id,
            **({"sliding_window": None} if family == "mistral" else {}),  # full attention, as Mistral v0.2+
        }
        config = AutoConfig.for_model(family, **(settings | (config or {})))
        ids = torch.tensor(hf_tokenizer(training_text(), add_special_tokens=False)["input_ids"])
        model = trained_model(config, ids, train_steps, seed, threads, hf_tokenizer.bos_token_id)
        # one file unless asked otherwise (transformers' own default is 50GB)
        model.to(getattr(torch, dtype)).save_pretrained(work, max_shard_size=max_shard_size or "50GB")
        hf_tokenizer.save_pretrained(work)
        try:
            work.rename(out_dir)
        except OSError:
            if not out_dir.exists():
                raise  # otherwise a concurrent build of the same recipe finished first: use that one
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def trained_model(
    config: PreTrainedConfig, ids: torch.Tensor, steps: int, seed: int, threads: int, bos_id: int | None
) -> PreTrainedModel:
    """A fresh model trained for `steps` AdamW steps on random windows of `ids` (next-token loss).

    Seeded and run on a fixed number of threads, so the same machine gets the same weights every time,
    without touching the caller's RNG state or thread count.
    """
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
            optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.1)
            warmup = max(1, steps // 10)
            schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine down to a tenth
                optimizer,
                lambda step: min((step + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))),
            )
            generator = torch.Generator().manual_seed(seed)
            model.train()
            size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
            for _ in track(range(steps), f"training {config.model_type} ({size})", total=steps):
                batch = windows(ids, BATCH_SIZE, bos_id, generator)
                model(input_ids=batch, labels=batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(caller_threads)
    return model.eval()


def windows(
    ids: torch.Tensor, count: int | None, bos_id: int | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`count` random windows of SEQ_LEN tokens (all consecutive ones if `count` is None),
    each led by BOS where the tokenizer adds one, as it does at inference."""
    body = SEQ_LEN - (bos_id is not None)
    if count is None:
        batch = ids[: len(ids) // body * body].view(-1, body)
    else:
        starts = torch.randint(len(ids) - body, (count,), generator=generator).tolist()
        batch = torch.stack([ids[start : start + body] for start in starts])
    if bos_id is not None:
        batch = torch.cat([torch.full((len(batch), 1), bos_id), batch], dim=1)
    return batch


def heldout_loss(checkpoint: Path) -> float:
    """Mean next-token loss (nats) of a saved checkpoint on the held-out text, in SEQ_LEN windows."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    batch = windows(
        torch.tensor(tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]),
        None,
        tokenizer.bos_token_id,
    )
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """The built-in demo model (Mistral architecture, SentencePiece tokenizer), built on first use."""
    return build_checkpoint(cache_root(cache_dir) / "demo" / f"mistral-demo-{DEMO_VERSION}")


# Small enough to train in about 15 s. One thread: operations this small gain nothing from a second one,
# and two threads on a busy machine wait on each other (several times slower).
SMALL = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 384,
    "train_steps": 120,
    "threads": 1,
}


def small_checkpoint(
    cache_dir: Path | None, family: str = "llama", tokenizer: str = "sentencepiece", **overrides
) -> Path:
    """A quickly trained small variant for tests, cached under a hash of its settings."""
    settings = {"family": family, "tokenizer": tokenizer, **SMALL, **overrides}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return build_checkpoint(cache_root(cache_dir) / "small" / f"{family}-{tokenizer}-{DEMO_VERSION}-{key}", **settings)
