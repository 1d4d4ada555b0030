"""GGUF vocabularies (convert/gguf_vocab.py) against their source, one tokenizer kind at a time, on the tokenizer
check's whole list.

Each tokenizer is trained here (tokenizers' BpeTrainer, SentencePiece's trainer) on the training text and saved
through transformers, as the Hub ships them; its GGUF vocabulary is written with no weights and read back by
llama.cpp vocabulary-only. Held-out text, the fixed and stress strings, every added token and the chat template
must tokenize as the source does, or differ only by a named known rule.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import sentencepiece as spm
from conftest import SILICONVERT
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from siliconvert.convert.gguf_vocab import GPT4O_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT, add_tokenizer
from siliconvert.errors import CheckpointError
from siliconvert.quantize.gguf import LlamaLog
from siliconvert.textdata import heldout_text, training_text
from siliconvert.validate.runners.gguf import llama_tokenize
from siliconvert.validate.tokenizer import TokenizerCheck, check_tokenizer, tokenizer_probes

BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
                "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")
SPM_SPECIALS = ["<unk>", "<s>", "</s>"]
# Phi-3's tokens added after its SentencePiece pieces, in id order, and its chat template (the Hub's)
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
PHI3_CHAT = ("{% for message in messages %}{% if message['role'] == 'system' %}"
             "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
             "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
             "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


# ---- building tokenizers ---------------------------------------------------------------------------


def save(backend: Tokenizer, folder: Path, **special: str) -> Path:
    """Save through transformers, as a fine-tuned checkpoint's tokenizer is saved."""
    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(folder)
    return folder


def byte_level_bpe(folder: Path, split: str | None, ignore_merges: bool = False) -> Path:
    """A byte-level BPE trained with BpeTrainer: GPT-2's own regex (split None) or a Split regex before it."""
    backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    backend.pre_tokenizer = (byte_level if split is None else
                             pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level]))
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                         special_tokens=BPE_SPECIALS)
    backend.train_from_iterator(training_text().split("\n\n"), trainer)
    backend.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    save(backend, folder, eos_token="<|endoftext|>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML}))
    return folder


@pytest.fixture(scope="session")
def sentencepiece_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two SentencePiece BPE models with byte fallback: Llama's (dummy prefix) and Gemma's (none)."""
    root = tmp_path_factory.mktemp("spm")
    lines = [line for line in training_text().splitlines() if line.strip()]
    paths = {}
    for name, dummy_prefix in (("llama", True), ("gemma", False)):
        paths[name] = root / f"{name}.model"
        with paths[name].open("wb") as out:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=out, vocab_size=700, model_type="bpe",
                byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=dummy_prefix,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_digits=True, num_threads=1, minloglevel=2)  # fmt: skip
    return paths


def sentencepiece_backend(model_file: Path) -> Tokenizer:
    """tokenizers' BPE model of a SentencePiece model, without normalizer, pre-tokenizer or decoder."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # SentencePiece merges the pair whose union scores highest; pieces are sorted by score, so every split of
    # every piece in id order gives tokenizers the same merge ranks (what transformers' converter does).
    merges = [(piece[:cut], piece[cut:]) for i, piece in enumerate(pieces)
              if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i))
              for cut in range(1, len(piece)) if piece[:cut] in vocab and piece[cut:] in vocab]
    return Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))


def sentencepiece_json(model_file: Path, folder: Path, style: str) -> Path:
    """tokenizer.json for a SentencePiece model, in one of the styles tokenizers and transformers have written:
    "legacy" (a Prepend normalizer), Metaspace with prepend_scheme "first" / "always" / "never", or "gemma"
    (spaces replaced, nothing prepended)."""
    backend = sentencepiece_backend(model_file)
    if style == "legacy":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif style == "gemma":
        backend.normalizer = normalizers.Replace(" ", "▁")
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=style, split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in SPM_SPECIALS])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("[INST]", "[/INST]")])
    save(backend, folder, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": MISTRAL_CHAT}))
    return folder


def sentencepiece_folder(models_: dict[str, Path], root: Path, style: str, files: str) -> Path:
    """A tokenizer folder: tokenizer.model only, tokenizer.json only, or both."""
    model_file = models_["gemma" if style == "gemma" else "llama"]
    folder = sentencepiece_json(model_file, root / f"{style}-{files}", style)
    if files != "json":
        shutil.copy(model_file, folder / "tokenizer.model")
    if files == "model":
        (folder / "tokenizer.json").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_class = "GemmaTokenizer" if style == "gemma" else "LlamaTokenizer"
        (folder / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": tokenizer_class}))
    return folder


def phi3_folder(model_file: Path, folder: Path, rstrip: bool = True) -> Path:
    """Phi-3's tokenizer files as the Hub ships them, on a SentencePiece model trained here: tokenizer.model, and
    tokenizer.json with a legacy normalizer and Phi-3's added tokens and flags (</s> not special and `rstrip`,
    <|endoftext|> special, every other <|…|> special and `rstrip`; `rstrip` False: none strips)."""
    backend = sentencepiece_backend(model_file)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>")])
    backend.add_tokens([AddedToken("</s>", special=False, rstrip=rstrip, normalized=False)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=rstrip and t != "<|endoftext|>")
                                for t in PHI3_ADDED])
    save(backend, folder, unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    shutil.copy(model_file, folder / "tokenizer.model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "chat_template": PHI3_CHAT}))
    return folder


# ---- GGUF vocabulary and llama.cpp -----------------------------------------------------------------


def vocab_gguf(folder: Path, path: Path, name: str | None = None) -> Path:
    """A GGUF holding the tokenizer of `folder` and the few hyper-parameters llama.cpp reads before it (and
    general.name, which llama.cpp reads token attributes by)."""
    vocab_size = len(AutoTokenizer.from_pretrained(folder))
    writer = gguf.GGUFWriter(path, "llama")
    if name is not None:
        writer.add_name(name)
    for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, 64),
                       (writer.add_feed_forward_length, 64), (writer.add_block_count, 1), (writer.add_head_count, 1),
                       (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    add_tokenizer(writer, SimpleNamespace(path=folder, spec=SimpleNamespace(vocab_size=vocab_size)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def llama_cpp_check(folder: Path, path: Path, strict: bool = False) -> TokenizerCheck:
    """The tokenizer check, llama.cpp reading the GGUF's vocabulary against transformers reading `folder`."""
    import llama_cpp

    api = llama_cpp.llama_cpp
    params = api.llama_model_default_params()
    params.vocab_only = True
    with LlamaLog():
        model = api.llama_model_load_from_file(str(path).encode(), params)
    assert model, "llama.cpp cannot load the vocabulary"
    try:
        probes = tokenizer_probes(AutoTokenizer.from_pretrained(folder), heldout_text(), "gguf")
        vocab = api.llama_model_get_vocab(model)
        ids = [llama_tokenize(api, vocab, text, path) for text in probes.artifact_texts]
    finally:
        with LlamaLog():
            api.llama_model_free(model)
    return check_tokenizer(probes, ids, strict)


def fields(path: Path) -> dict[str, object]:
    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}


# ---- byte-level BPE --------------------------------------------------------------------------------


# name → (Split regex before ByteLevel or None for ByteLevel's own, ignore_merges, config.json's model_type,
# llama.cpp's pre-tokenizer, the known rules that remain)
BYTE_LEVEL_CASES = {
    "gpt2": (None, False, None, "gpt-2", set()),
    "llama3": (LLAMA3_SPLIT, True, None, "llama-bpe", set()),
    "qwen2": (QWEN2_SPLIT, False, None, "qwen2", set()),
    "gpt-4o": (GPT4O_SPLIT, False, None, "gpt-4o", set()),  # o200k: Phi-4-mini's
    # The case: a GPT-2-regex tokenizer.json in a Qwen2 checkpoint. transformers 5 loads it as
    # Qwen2Tokenizer, which applies Qwen2's regex and NFC whatever the file says: the GGUF follows what it loads.
    "gpt2-json-in-qwen2-checkpoint": (None, False, "qwen2", "qwen2", {"nfc"}),
}


@pytest.mark.parametrize("case", list(BYTE_LEVEL_CASES))
def test_byte_level_bpe_tokenizes_as_the_source(tmp_path: Path, case: str) -> None:
    split, ignore_merges, model_type, pre, rules = BYTE_LEVEL_CASES[case]
    folder = byte_level_bpe(tmp_path / "tokenizer", split, ignore_merges)
    if model_type is not None:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    path = vocab_gguf(folder, tmp_path / "vocab.gguf")
    assert fields(path)["tokenizer.ggml.pre"] == pre
    check = llama_cpp_check(folder, path)
    assert check["unexplained"] == 0, check["differences"]
    assert set(check["known"]) == rules and check["identical"] == check["probes"] - len(rules)
    probes = tokenizer_probes(AutoTokenizer.from_pretrained(folder), "corpus", "gguf").probes
    assert {"chat template", "added token '<tool>'", "added token '<|im_end|>'"} <= {p.label for p in probes}


def test_byte_level_added_tokens_that_strip_name_the_rule(tmp_path: Path) -> None:
    """Phi-4-mini's kind: a byte-level BPE whose added tokens take the whitespace around them. llama.cpp keeps it
    (no name of this file makes it strip), and the rule explains exactly the texts that have some."""
    folder = byte_level_bpe(tmp_path / "tokenizer", GPT4O_SPLIT)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    for added in tokenizer["added_tokens"]:
        added["lstrip"], added["rstrip"] = added["content"] == "<|im_start|>", added["content"] == "<|im_end|>"
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    check = llama_cpp_check(folder, vocab_gguf(folder, tmp_path / "vocab.gguf"))
    assert check["unexplained"] == 0 and check["passed"], check["differences"]
    # measured: the added tokens in text, between spaces, and the chat prompt ("<|im_end|>\n")
    assert set(check["known"]) == {"added-token-strip"} and check["known"]["added-token-strip"]["probes"] == 3
    assert not llama_cpp_check(folder, tmp_path / "vocab.gguf", strict=True)["passed"]


def test_a_wrong_vocabulary_fails_the_check(tmp_path: Path) -> None:
    """Merges in another order give other ids on ordinary text: no known rule explains that away."""
    folder = byte_level_bpe(tmp_path / "tokenizer", QWEN2_SPLIT)
    wrong = shutil.copytree(folder, tmp_path / "wrong")
    tokenizer = json.loads((wrong / "tokenizer.json").read_text())
    tokenizer["model"]["merges"].reverse()
    (wrong / "tokenizer.json").write_text(json.dumps(tokenizer))
    check = llama_cpp_check(folder, vocab_gguf(wrong, tmp_path / "wrong.gguf"))
    assert not check["passed"] and check["known"] == {} and check["unexplained"] > 10  # measured: 21 of 64
    first = check["differences"][0]
    assert first.startswith("corpus ('") and "but the source tokenizer gives" in first


# ---- SentencePiece ---------------------------------------------------------------------------------


# (Metaspace style, files) → (add_space_prefix, the known rules that remain). tokenizer.model alone is what
# transformers 5 makes of it: a Metaspace with prepend_scheme "first" (LlamaTokenizer), or Gemma's own pipeline.
SENTENCEPIECE_CASES = {
    ("legacy", "model"): (False, {"no-space-prefix"}), ("legacy", "json"): (True, set()),
    ("legacy", "both"): (True, set()),
    ("first", "json"): (False, {"no-space-prefix"}), ("first", "both"): (False, {"no-space-prefix"}),
    ("always", "json"): (True, {"space-prefix"}), ("always", "both"): (True, {"space-prefix"}),
    ("never", "json"): (False, set()), ("never", "both"): (False, set()),
    ("gemma", "model"): (False, set()), ("gemma", "json"): (False, set()), ("gemma", "both"): (False, set()),
}


@pytest.mark.parametrize(("style", "files"), list(SENTENCEPIECE_CASES), ids="-".join)
def test_sentencepiece_matches_or_names_the_rule(sentencepiece_models: dict[str, Path], tmp_path: Path, style: str,
                                                files: str) -> None:
    space_prefix, rules = SENTENCEPIECE_CASES[style, files]
    folder = sentencepiece_folder(sentencepiece_models, tmp_path, style, files)
    path = vocab_gguf(folder, tmp_path / "vocab.gguf")
    meta = fields(path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is space_prefix
    check = llama_cpp_check(folder, path)
    assert check["unexplained"] == 0 and check["passed"], check["differences"]
    assert set(check["known"]) == rules
    if not rules:
        assert check["identical"] == check["probes"]
    else:  # a known rule warns; validate.tokenizer: strict makes it fail
        assert not llama_cpp_check(folder, path, strict=True)["passed"]


def test_sentencepiece_json_and_model_write_the_same_vocabulary(sentencepiece_models: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """tokenizer.json alone gives the pieces, types and merge order tokenizer.model gives beside it (scores differ
    in value, not in order)."""
    from_json = fields(vocab_gguf(sentencepiece_folder(sentencepiece_models, tmp_path, "legacy", "json"),
                                  tmp_path / "json.gguf"))
    from_model = fields(vocab_gguf(sentencepiece_folder(sentencepiece_models, tmp_path, "legacy", "both"),
                                   tmp_path / "model.gguf"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id"):
        assert from_json[key] == from_model[key], key
    normal = [i for i, kind in enumerate(from_model["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.NORMAL]
    merged = [i for i in normal if len(from_model["tokenizer.ggml.tokens"][i]) > 1]
    for scores in (from_json["tokenizer.ggml.scores"], from_model["tokenizer.ggml.scores"]):
        assert [scores[i] for i in merged] == sorted((scores[i] for i in merged), reverse=True)


def test_other_tokenizers_are_refused_by_name(tmp_path: Path) -> None:
    folder = save(Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), tmp_path / "wordlevel")
    with pytest.raises(CheckpointError, match="neither a byte-level BPE nor a SentencePiece") as error:
        vocab_gguf(folder, tmp_path / "vocab.gguf")
    assert "tokenizer.json" in str(error.value)


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    folder = byte_level_bpe(tmp_path / "tokenizer", QWEN2_SPLIT)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,2}|\s+"
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(CheckpointError, match="no pre-tokenizer") as error:
        vocab_gguf(folder, tmp_path / "vocab.gguf")
    assert "tokenizer.json" in str(error.value)


# ---- Phi-3: added tokens that strip the whitespace after them ----------------------------------------


# general.name → the known rules that remain. llama.cpp reads no strip flags from a GGUF; it sets Phi-3's own
# (every special token strips what follows, but <unk>, <s> and <|endoftext|>; </s> does) in a file named phi3.
PHI3_CASES = {None: {"no-space-prefix", "added-token-strip"}, "Phi-3-mini-4k-instruct": {"no-space-prefix"}}


@pytest.mark.parametrize("name", list(PHI3_CASES))
def test_phi3_vocabulary_matches_or_names_the_strip_rule(sentencepiece_models: dict[str, Path], tmp_path: Path,
                                                          name: str | None) -> None:
    folder = phi3_folder(sentencepiece_models["llama"], tmp_path / "phi3")
    path = vocab_gguf(folder, tmp_path / "vocab.gguf", name)
    meta = fields(path)
    # </s> is not special in Phi-3: user-defined, so llama.cpp matches it in any text, as transformers does
    assert meta["tokenizer.ggml.token_type"][2] == gguf.TokenType.USER_DEFINED
    assert meta["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL
    check = llama_cpp_check(folder, path)
    assert check["unexplained"] == 0 and check["passed"], check["differences"]
    assert set(check["known"]) == PHI3_CASES[name]
    assert not llama_cpp_check(folder, path, strict=True)["passed"]
    if name is None:  # added tokens in text, between spaces, and the chat prompt ("<|user|>\n" is one token there)
        assert check["known"]["added-token-strip"]["probes"] == 3


def test_strip_rule_explains_nothing_else(sentencepiece_models: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp strips after every special token of a GGUF named phi3: a vocabulary whose added tokens strip
    nothing then differs where no known rule explains it, and the check fails."""
    folder = phi3_folder(sentencepiece_models["llama"], tmp_path / "phi3", rstrip=False)
    check = llama_cpp_check(folder, vocab_gguf(folder, tmp_path / "vocab.gguf", "Phi-3-mini-4k-instruct"))
    assert not check["passed"] and check["unexplained"] == 3 and "added-token-strip" not in check["known"]
    assert [d.split(" (")[0] for d in check["differences"]] == ["added tokens in text", "added tokens between spaces",
                                                                 "chat template"]


# ---- Mistral's own tokenizer layout through the real recipe -----------------------------------------


def mistral_layout(source: Path, folder: Path) -> Path:
    """`source` with the tokenizer files transformers 5 saves for a Mistral checkpoint: tokenizer.json (Metaspace,
    prepend_scheme "first", split false) and tokenizer_config.json, no tokenizer.model."""
    shutil.copytree(source, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False, "chat_template": MISTRAL_CHAT}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    (folder / "tokenizer.model").unlink()
    return folder


@pytest.mark.slow
def test_mistral_recipe_gguf_targets_pass_on_mistrals_tokenizer_layout(small_model, tmp_path: Path) -> None:
    import subprocess

    import yaml

    source = mistral_layout(small_model("mistral", "sentencepiece", tie_word_embeddings=False), tmp_path / "source")
    assert sorted(p.name for p in source.glob("tokenizer*")) == ["tokenizer.json", "tokenizer_config.json"]
    [metaspace] = json.loads((source / "tokenizer.json").read_text())["pre_tokenizer"]["pretokenizers"]
    assert metaspace == {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "mistral-7b.yaml").read_text())
    recipe |= {"source": str(source), "output": str(tmp_path / "out"),
               "targets": [t for t in recipe["targets"] if t["format"] == "gguf"]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([SILICONVERT, "recipe", str(tmp_path / "recipe.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [a["quant"] for a in report["artifacts"]] == ["Q4_K_M", "Q8_0"]
    for artifact in report["artifacts"]:
        check = artifact["tokenizer"]
        assert artifact["gates"]["passed"] and check["passed"] and check["unexplained"] == 0
        assert set(check["known"]) == {"no-space-prefix"} and artifact["tokenizer_match"] is False
        meta = fields(Path(artifact["path"]))
        assert meta["tokenizer.ggml.add_space_prefix"] is False and meta["tokenizer.ggml.add_bos_token"] is True
        assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.unknown_token_id"] == 0
    card = (tmp_path / "out" / "release" / "Mistral-7B-Instruct-v0.3-GGUF" / "README.md").read_text()
    assert "no-space-prefix" in card and "no-space-prefix" in (tmp_path / "out" / "report.md").read_text()
    # validate.tokenizer: strict turns the known rule into a failure (the artifacts and reference are reused)
    recipe["validate"]["tokenizer"] = "strict"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = subprocess.run([SILICONVERT, "recipe", str(tmp_path / "recipe.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "known rules (no-space-prefix; validate.tokenizer: strict)" in result.stdout + result.stderr


@pytest.mark.slow
def test_mlx_folder_ships_a_tokenizer_that_agrees(small_model, tmp_path: Path) -> None:
    """An MLX folder carries the source's tokenizer files: mlx-lm loads them and every probe text agrees."""
    from conftest import build_mlx

    from siliconvert.validate.runners.mlx import MLXRunner

    source = mistral_layout(small_model("mistral", "sentencepiece", tie_word_embeddings=False), tmp_path / "source")
    artifact = build_mlx(source, tmp_path / "mlx")
    probes = tokenizer_probes(AutoTokenizer.from_pretrained(source), heldout_text(), "mlx")
    runner = MLXRunner(artifact.path, {"engine": "mlx"})
    check = check_tokenizer(probes, [runner.tokenize(text) for text in probes.artifact_texts], strict=True)
    assert check["passed"] and check["identical"] == check["probes"]


def test_doubts_about_pair_templates_are_not_printed(demo_model, tmp_path, caplog):
    # The demo's tokenizer.json, as a Llama tokenizer saves it, has a pair template "<s> A <s> B"; gguf-py warned
    # "Unknown separator token '<s>' in TemplateProcessing<pair>" on every GGUF of it.
    template = json.loads((demo_model / "tokenizer.json").read_text())["post_processor"]
    assert "<s>" in json.dumps(template["pair"])
    with caplog.at_level("WARNING", logger="gguf"):
        vocab_gguf(demo_model, tmp_path / "vocab.gguf")
    assert not [record for record in caplog.records if record.name.startswith("gguf")]


def test_an_eos_only_generation_config_names_is_the_gguf_eos(family_model, tmp_path):
    """transformers stops on generation_config.json's eos_token_id; gguf-py reads only config.json and
    tokenizer_config.json, so without this the GGUF had no eos id and llama.cpp took token 11."""
    from siliconvert.checkpoint import Checkpoint
    from siliconvert.convert.gguf_vocab import _tokenizer_kind, special_vocab

    folder = tmp_path / "ckpt"
    shutil.copytree(family_model("qwen3"), folder)
    for name, key, value in (("config.json", "eos_token_id", None), ("tokenizer_config.json", "eos_token", None),
                             ("generation_config.json", "eos_token_id", [1021, 7])):
        parsed = json.loads((folder / name).read_text())
        parsed[key] = value
        (folder / name).write_text(json.dumps(parsed))
    checkpoint = Checkpoint.open(folder)
    special = special_vocab(checkpoint, *_tokenizer_kind(checkpoint))
    assert special.special_token_ids["eos"] == 1021
    assert special.add_special_token == {"bos": False, "eos": False}
