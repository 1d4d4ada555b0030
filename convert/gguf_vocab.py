"""GGUF tokenizer metadata: a vocabulary that llama.cpp tokenizes as the source tokenizer does.

Two kinds of tokenizer reach llama.cpp, and both are derived from what the files say, never from a list of
known models:
- Byte-level BPE (GPT-2, Llama 3, Qwen2, Phi-4-mini's o200k): tokens, merges, and llama.cpp's name for the
  pre-tokenizer, chosen from the regexes tokenizer.json actually applies (`BPE_PRE_TOKENIZERS`), never from a hash
  of sample outputs.
- SentencePiece BPE (Llama 2, Mistral, Gemma): pieces with scores; llama.cpp merges the adjacent pair whose
  union scores highest. From tokenizer.model, or from tokenizer.json alone (what transformers 5 saves): there a
  piece's score is minus the rank of the first merge that makes it, so llama.cpp merges in the source's order.
  Whether llama.cpp puts `▁` before text (`add_space_prefix`) follows the source's rule; where llama.cpp has no
  equivalent (Metaspace's prepend_scheme "first" adds one only at the start of an input that does not begin
  with a space), the setting that agrees on the most text is taken (`PREPEND_SCHEMES`), and the tokenizer check
  reports what remains as a known rule (validate/tokenizer.py).
Added tokens are control tokens where the source calls them special, user-defined otherwise. Their `lstrip` and
`rstrip` flags have no GGUF key: llama.cpp sets Phi-3's by the file's general.name alone (llama-vocab.cpp), and the
tokenizer check names what remains (`added-token-strip`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType
from sentencepiece import sentencepiece_model_pb2

from siliconvert.checkpoint import Checkpoint
from siliconvert.errors import CheckpointError

# Regexes tokenizers' pre-tokenizers apply, as tokenizer.json spells them.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # ByteLevel's own
SINGLE_DIGITS = r"\p{N}"  # Digits(individual_digits=True)
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN35_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"""
                r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# o200k's (GPT-4o, Phi-4-mini): letters by case, marks with them, digits by three
GPT4O_SPLIT = (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
               r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"""
               r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# The splits a byte-level BPE applies, in order → llama.cpp's pre-tokenizer implementing exactly them
# (src/llama-vocab.cpp), and whether that pre-tokenizer looks whole words up before merging (ignore_merges).
BPE_PRE_TOKENIZERS: dict[tuple[str, ...], tuple[str, bool]] = {
    (GPT2_SPLIT,): ("gpt-2", False),
    (SINGLE_DIGITS, GPT2_SPLIT): ("starcoder", False),
    (LLAMA3_SPLIT,): ("llama-bpe", True),
    (QWEN2_SPLIT,): ("qwen2", False),
    (QWEN35_SPLIT,): ("qwen35", False),
    (GPT4O_SPLIT,): ("gpt-4o", False),
}
# Normalizers llama.cpp's BPE tokenizer may skip: NFC leaves already-composed text (nearly all text) as is.
# The tokenizer check reports the rest ("text not in NFC") as a known rule.
HARMLESS_NORMALIZERS = (None, "NFC")
SPACE = "▁"  # SentencePiece's whitespace symbol
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte-fallback pieces
# Metaspace's prepend_scheme → llama.cpp's add_space_prefix, which puts "▁" before the input and after every
# special token, or nowhere. "always" does the same except where the text already begins with a space. "first"
# (transformers 5's Llama, Mistral and Phi-3 tokenizers) prepends only at the very start of an input that does not
# begin with a space: never after a special token, so off agrees on every prompt a chat template renders (those
# begin with a special token) and on inputs that begin with a space; on raw text that does not, on agrees.
# Measured on the held-out text, tokenizer.json with prepend_scheme "first", off against on: paragraphs
# 119 / 210 against 91 / 210, lines 336 / 563 against 227 / 563, chat prompts 210 / 210 against 0 / 210.
PREPEND_SCHEMES = {"always": True, "first": False, "never": False}
SPECIAL_TYPES = (TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED)


def add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Checkpoint) -> None:
    """Vocabulary, merges or scores, special tokens, add-bos/eos flags and chat template."""
    folder, vocab_size = checkpoint.path, checkpoint.spec.vocab_size
    proto, tokenizer_json, model = _tokenizer_kind(checkpoint)
    if model == "gpt2":
        _add_byte_level_bpe(writer, tokenizer_json, vocab_size, folder / "tokenizer.json")
    elif model == "llama":
        _add_sentencepiece(writer, folder, proto, tokenizer_json, vocab_size)
    else:
        raise CheckpointError("neither a byte-level BPE nor a SentencePiece BPE tokenizer (byte fallback, "
                              "Metaspace), and there is no tokenizer.model next to it", folder / "tokenizer.json")
    special = special_vocab(checkpoint, proto, tokenizer_json, model)
    template, special.chat_template = special.chat_template, None
    special.add_to_gguf(writer, quiet=True)
    if template is not None:
        _add_chat_templates(writer, template)


def check_special_tokens(checkpoint: Checkpoint) -> None:
    """The special tokens a GGUF needs, checked before the pass (`special_vocab`); a tokenizer of neither kind is
    left to the writer's refusal."""
    proto, tokenizer_json, model = _tokenizer_kind(checkpoint)
    if model is not None:
        special_vocab(checkpoint, proto, tokenizer_json, model)


def _tokenizer_kind(checkpoint: Checkpoint) -> tuple[Any, dict, str | None]:
    """(SentencePiece model or None, tokenizer.json as transformers runs it, llama.cpp's tokenizer model: "gpt2"
    for a byte-level BPE, "llama" for a SentencePiece one, None for neither)."""
    folder = checkpoint.path
    has_json = _read_json(folder / "tokenizer.json") is not None
    proto = _sentencepiece_proto(folder / "tokenizer.model") if (folder / "tokenizer.model").is_file() else None
    if not has_json and proto is None:
        raise CheckpointError("no tokenizer (neither tokenizer.json nor tokenizer.model)", folder)
    tokenizer_json = source_pipeline(folder, folder / ("tokenizer.json" if has_json else "tokenizer.model"))
    if _is_byte_level_bpe(tokenizer_json):
        return proto, tokenizer_json, "gpt2"
    if proto is not None or _is_sentencepiece_bpe(tokenizer_json):
        return proto, tokenizer_json, "llama"
    return proto, tokenizer_json, None


def special_vocab(checkpoint: Checkpoint, proto: Any, tokenizer_json: dict, model: str) -> gguf.SpecialVocab:
    """gguf-py's special token ids and add-bos/eos flags, completed from the SentencePiece model and
    generation_config.json, and refused where llama.cpp would fill a gap with its own default: with no eos id it
    ends text at its default token (11 for a byte-level BPE, a word in most vocabularies), and with add_bos_token
    and no bos id it puts that token before every prompt."""
    folder, vocab_size = checkpoint.path, checkpoint.spec.vocab_size
    vocab_log = logging.getLogger("gguf.vocab")
    vocab_log.addFilter(_not_about_pairs)
    try:
        special = gguf.SpecialVocab(folder, n_vocab=vocab_size)
    finally:
        vocab_log.removeFilter(_not_about_pairs)
    if model == "llama":  # the model's own unk/bos/eos/pad ids fill what tokenizer_config.json leaves out
        for kind, token_id in _sentencepiece_special_ids(proto, tokenizer_json).items():
            if 0 <= token_id < vocab_size:
                special.special_token_ids.setdefault(kind, token_id)
    generation = (_read_json(folder / "generation_config.json") or {}).get("eos_token_id")
    for token_id in generation if isinstance(generation, list) else [generation]:  # transformers stops on it too
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            special.special_token_ids.setdefault("eos", token_id)
            break
    if "eos" not in special.special_token_ids:
        raise CheckpointError(f"no end-of-text token within the model's vocabulary of {vocab_size}: neither "
                              "config.json's nor generation_config.json's eos_token_id, nor tokenizer_config.json's "
                              "eos_token names one, and a GGUF without one ends text where llama.cpp's default "
                              "says", folder / "config.json")
    if special.add_special_token.get("bos") and "bos" not in special.special_token_ids:
        raise CheckpointError("add_bos_token is true, but no bos token within the vocabulary is named "
                              "(tokenizer_config.json's bos_token, config.json's bos_token_id)",
                              folder / "tokenizer_config.json")
    # Both flags always written: llama.cpp's defaults differ by tokenizer kind and pre-tokenizer.
    # Without a word from the files, transformers adds a BOS for SentencePiece (LlamaTokenizer) only, and only one
    # it has.
    special.add_special_token.setdefault("bos", model == "llama" and "bos" in special.special_token_ids)
    special.add_special_token.setdefault("eos", False)
    return special


def _not_about_pairs(record: logging.LogRecord) -> bool:
    """gguf-py's doubts about the template for a pair of texts (BERT-style "A <s> B"): a causal model is never
    given a pair, and llama.cpp builds none, so they say nothing about this file."""
    return "TemplateProcessing<pair>" not in record.getMessage()


# ---- byte-level BPE ------------------------------------------------------------------------------


def _add_byte_level_bpe(writer: gguf.GGUFWriter, tokenizer: dict, vocab_size: int, where: Path) -> None:
    pre = bpe_pre_tokenizer(tokenizer, where)
    vocab: dict[int, tuple[str, TokenType]] = {i: (t, TokenType.NORMAL) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        # Special added tokens are control tokens (parsed only on request, like transformers' specials);
        # other added tokens llama.cpp matches everywhere, as transformers does.
        vocab[added["id"]] = (added["content"], TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
    if max(vocab) >= vocab_size:
        raise CheckpointError(f"token id {max(vocab)} does not fit the model's vocab_size {vocab_size}", where)
    tokens = [vocab.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([text for text, _ in tokens])
    writer.add_token_types([kind for _, kind in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])


def bpe_pre_tokenizer(tokenizer: dict, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer tokenizer.json describes, from the regexes it applies."""
    normalizer = (tokenizer.get("normalizer") or {}).get("type")
    if normalizer not in HARMLESS_NORMALIZERS:
        raise CheckpointError(f"normalizer {normalizer!r} has no llama.cpp equivalent", where)
    splits = []
    for step in pipeline_steps(tokenizer.get("pre_tokenizer"), "pretokenizers"):
        kind = step["type"]
        if kind == "Split" and "Regex" in step["pattern"] and step["behavior"] == "Isolated" and not step["invert"]:
            splits.append(step["pattern"]["Regex"])
        elif kind == "Digits" and step.get("individual_digits"):
            splits.append(SINGLE_DIGITS)
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            if step.get("use_regex", True):
                splits.append(GPT2_SPLIT)
        else:
            raise CheckpointError(f"pre-tokenizer step {json.dumps(step)} has no llama.cpp equivalent", where)
    if tuple(splits) not in BPE_PRE_TOKENIZERS:
        raise CheckpointError(f"llama.cpp has no pre-tokenizer splitting text by {splits}", where)
    name, ignore_merges = BPE_PRE_TOKENIZERS[tuple(splits)]
    if bool(tokenizer["model"].get("ignore_merges")) != ignore_merges:
        raise CheckpointError(f"ignore_merges={not ignore_merges} does not match llama.cpp's {name!r} "
                              f"pre-tokenizer, which has ignore_merges={ignore_merges}", where)
    return name


def _is_byte_level_bpe(tokenizer: dict) -> bool:
    steps = [*pipeline_steps(tokenizer.get("pre_tokenizer"), "pretokenizers"), tokenizer.get("decoder") or {}]
    model = tokenizer.get("model", {})
    return (model.get("type") == "BPE" and not model.get("byte_fallback")
            and any(s.get("type") == "ByteLevel" for s in steps))


# ---- SentencePiece BPE ---------------------------------------------------------------------------


def _add_sentencepiece(writer: gguf.GGUFWriter, folder: Path, proto: Any, tokenizer_json: dict,
                       vocab_size: int) -> None:
    where = folder / ("tokenizer.model" if proto is not None else "tokenizer.json")
    if proto is not None:
        tokens = _pieces_from_model(proto, vocab_size, where)
    else:
        tokens = _pieces_from_json(tokenizer_json, vocab_size, where)
    for token_id, content, special in _added_tokens(folder, tokenizer_json):
        piece = tokens[token_id] if token_id < len(tokens) else None
        # A control piece the source adds as not special (Phi-3's </s>) is user-defined: llama.cpp then matches it
        # in any text, as transformers does, where it would skip a control token unless asked to parse specials.
        if piece and piece[0] == content and piece[2] in SPECIAL_TYPES and (special or piece[2] != TokenType.CONTROL):
            continue  # the piece itself (<s>, </s>, <unk> in tokenizer.model): its type is already right
        if token_id >= vocab_size:
            raise CheckpointError(f"added token {content!r} (id {token_id}) does not fit vocab_size {vocab_size}",
                                  where)
        kind = TokenType.CONTROL if special else TokenType.USER_DEFINED
        tokens[token_id] = (content if special else content.replace(SPACE, " "), -1000.0, kind)
    space_prefix = sentencepiece_space_prefix(tokenizer_json, where)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([text for text, _, _ in tokens])
    writer.add_token_scores([score for _, score, _ in tokens])
    writer.add_token_types([kind for _, _, kind in tokens])
    writer.add_add_space_prefix(space_prefix)


def _pieces_from_model(proto: Any, vocab_size: int, where: Path) -> list[tuple[str, float, TokenType]]:
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise CheckpointError("only SentencePiece BPE models have a llama.cpp equivalent", where)
    if len(proto.pieces) > vocab_size:
        raise CheckpointError(f"{len(proto.pieces)} pieces do not fit the model's vocab_size {vocab_size}", where)
    # SentencePiece's piece types are numbered as GGUF's token types (normal, unknown, control, ...).
    tokens = [(p.piece, p.score, TokenType(p.type)) for p in proto.pieces]
    return tokens + _padding(len(tokens), vocab_size)


def _pieces_from_json(tokenizer: dict, vocab_size: int, where: Path) -> list[tuple[str, float, TokenType]]:
    """SentencePiece pieces from tokenizer.json's BPE model. transformers merges by rank, llama.cpp by score:
    a piece scores minus the rank of the first merge that makes it, so both merge in the same order. Every other
    piece scores below all merges: characters and bytes are never formed from two symbols, and llama.cpp would
    form a longer piece no merge makes (transformers never does) only after every real merge."""
    model = tokenizer["model"]
    merges = model.get("merges") or []
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_rank.setdefault(left + right, rank)
    by_id: dict[int, tuple[str, float, TokenType]] = {}
    for piece, token_id in model["vocab"].items():
        if piece == model.get("unk_token"):
            kind = TokenType.UNKNOWN
        elif model.get("byte_fallback") and BYTE_PIECE.fullmatch(piece):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        by_id[token_id] = (piece, -float(first_rank.get(piece, len(merges))), kind)
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"token id {max(by_id)} does not fit the model's vocab_size {vocab_size}", where)
    padding = dict(enumerate(_padding(0, vocab_size)))
    return [by_id.get(i, padding[i]) for i in range(vocab_size)]


def sentencepiece_space_prefix(tokenizer: dict, where: Path) -> bool:
    """Whether llama.cpp should put "▁" before text, from the source's normalizer and pre-tokenizer: a legacy
    `Prepend("▁")` normalizer or a Metaspace pre-tokenizer that prepends (see PREPEND_SCHEMES); Gemma's
    tokenizers only replace spaces and prepend nothing."""
    prepend, replaces_spaces = False, False
    for step in pipeline_steps(tokenizer.get("normalizer"), "normalizers"):
        if step["type"] == "Prepend" and step["prepend"] == SPACE:
            prepend = True
        elif step["type"] == "Replace" and step["pattern"].get("String") == " " and step["content"] == SPACE:
            replaces_spaces = True
        else:
            raise CheckpointError(f"normalizer step {json.dumps(step)} has no llama.cpp equivalent", where)
    for step in pipeline_steps(tokenizer.get("pre_tokenizer"), "pretokenizers"):
        if step["type"] == "Split" and step["pattern"].get("String") == " " and replaces_spaces:
            continue  # transformers 5's GemmaTokenizer: the normalizer left no space to split at
        if step["type"] != "Metaspace" or step.get("replacement") != SPACE:
            raise CheckpointError(f"pre-tokenizer step {json.dumps(step)} has no llama.cpp equivalent", where)
        # tokenizers before 0.19 wrote add_prefix_space instead of prepend_scheme
        scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        prepend, replaces_spaces = PREPEND_SCHEMES[scheme], True
    if not replaces_spaces:
        raise CheckpointError("a SentencePiece tokenizer that does not turn spaces into '▁' has no llama.cpp "
                              "equivalent", where)
    return prepend


def _is_sentencepiece_bpe(tokenizer: dict) -> bool:
    model = tokenizer.get("model", {})
    steps = [*pipeline_steps(tokenizer.get("pre_tokenizer"), "pretokenizers"),
             *pipeline_steps(tokenizer.get("normalizer"), "normalizers")]
    return model.get("type") == "BPE" and (bool(model.get("byte_fallback"))
                                           or any(s["type"] == "Metaspace" for s in steps))


def _sentencepiece_special_ids(proto: Any, tokenizer_json: dict) -> dict[str, int]:
    if proto is not None:
        return {kind: getattr(proto.trainer_spec, f"{kind}_id") for kind in ("unk", "bos", "eos", "pad")}
    model = tokenizer_json["model"]
    unk = model.get("unk_token")
    return {"unk": model["vocab"][unk]} if unk in model["vocab"] else {}


def _added_tokens(folder: Path, tokenizer_json: dict) -> list[tuple[int, str, bool]]:
    """(id, text, special) of tokens added on top of the SentencePiece model, wherever transformers keeps them."""
    added = {t["id"]: (t["content"], t["special"]) for t in tokenizer_json.get("added_tokens", [])}
    config = _read_json(folder / "tokenizer_config.json") or {}
    for token_id, token in config.get("added_tokens_decoder", {}).items():
        added.setdefault(int(token_id), (token["content"], token.get("special", False)))
    return [(i, content, special) for i, (content, special) in sorted(added.items())]


def _padding(start: int, vocab_size: int) -> list[tuple[str, float, TokenType]]:
    return [(f"[PAD{i}]", -1000.0, TokenType.UNUSED) for i in range(start, vocab_size)]


# ---- shared --------------------------------------------------------------------------------------


def source_pipeline(folder: Path, where: Path) -> dict:
    """tokenizer.json as transformers runs it. transformers 5's tokenizer classes rebuild their normalizer and
    pre-tokenizer on load, whatever the file says (Qwen2Tokenizer, picked for a qwen2 checkpoint, applies its own
    regex to a GPT-2-regex tokenizer.json; LlamaTokenizer its own Metaspace): the source is what it loads."""
    from siliconvert.corpus import source_tokenizer

    try:
        tokenizer = source_tokenizer(folder)
    except Exception as e:  # tokenizers' and transformers' errors alike: the file is what is wrong
        raise CheckpointError(f"transformers cannot load the tokenizer ({str(e).splitlines()[0]})", where) from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"transformers loads this tokenizer as {type(tokenizer).__name__}, without a tokenizers "
                              "pipeline to derive llama.cpp's settings from", where)
    return json.loads(backend.to_str())


def _add_chat_templates(writer: gguf.GGUFWriter, template: str | list[dict[str, str]]) -> None:
    # gguf-py's add_chat_template lists named templates from a set, in hash order: sorted here instead,
    # so that the same input gives the same bytes.
    if isinstance(template, str):
        writer.add_chat_template(template)
        return
    named = {t["name"]: t["template"] for t in template}
    for name in sorted(set(named) - {"default"}):
        writer.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), named[name])
    writer.add_array(gguf.Keys.Tokenizer.CHAT_TEMPLATES, sorted(set(named) - {"default"}))
    if "default" in named:
        writer.add_chat_template(named["default"])


def pipeline_steps(step: dict | None, inner: str) -> list[dict]:
    """The steps of a normalizer or pre-tokenizer, `Sequence`s unrolled (`inner`: the key of their list)."""
    if step is None:
        return []
    if step["type"] == "Sequence":
        return [s for nested in step[inner] for s in pipeline_steps(nested, inner)]
    return [step]


def _sentencepiece_proto(path: Path) -> Any:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # protobuf's DecodeError, or worse on a damaged file
        raise CheckpointError("not a SentencePiece model", path) from None
    return proto


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not valid JSON ({e})", path) from None
