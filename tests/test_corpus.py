"""The scored windows: the corpus read (or refused) once, tokenized once, cut into windows that start as a prompt
would."""

from __future__ import annotations

import numpy as np
import pytest

from siliconvert.corpus import load_text, token_windows
from siliconvert.errors import RecipeError


class CharTokenizer:
    """One id per character (+ 10), with an optional BOS the tokenizer adds to every sequence, as transformers'
    tokenizers do."""

    def __init__(self, bos: int | None) -> None:
        self.bos_token_id = bos

    def encode(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> list[int]:
        ids = [10 + ord(c) % 50 for c in text]
        return [self.bos_token_id, *ids] if add_special_tokens and self.bos_token_id is not None else ids


def test_builtin_is_the_held_out_text():
    from siliconvert.textdata import heldout_text

    text, label = load_text("builtin")
    assert text == heldout_text() and label.startswith("builtin")


def test_a_corpus_file_is_read_and_named_by_its_path(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("naïve text\n", encoding="utf-8")
    assert load_text(str(path)) == ("naïve text\n", str(path))


@pytest.mark.parametrize(("content", "message"), [(None, "not a regular file"), (b"  \n", "is empty"),
                                                  (b"ok \xff", "not UTF-8 text"), ("missing", "cannot read")])
def test_an_unreadable_corpus_is_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "corpus"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(RecipeError, match=message):
        load_text(str(path))


@pytest.mark.parametrize("bos", [1, None])
def test_windows_start_with_bos_where_the_tokenizer_adds_it(tmp_path, bos):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 10)
    windows = token_windows(CharTokenizer(bos), str(path), n_tokens=25, context=8)
    assert windows.tokens.shape == (3, 8) and windows.corpus == str(path)
    ids = CharTokenizer(None).encode(path.read_text())
    if bos is None:
        np.testing.assert_array_equal(windows.tokens.reshape(-1), ids[:24])
    else:
        assert (windows.tokens[:, 0] == bos).all()
        np.testing.assert_array_equal(windows.tokens[:, 1:].reshape(-1), ids[:21])
    np.testing.assert_array_equal(windows.targets, windows.tokens[:, 1:])
    assert windows.digest == token_windows(CharTokenizer(bos), str(path), 25, 8).digest


def test_a_corpus_too_short_for_the_windows_is_refused(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij")
    with pytest.raises(RecipeError, match=r"the corpus has 10 tokens; validate\.tokens=16 needs 16"):
        token_windows(CharTokenizer(None), str(path), n_tokens=16, context=8)


def test_a_corpus_longer_than_the_model_is_tokenized_without_a_warning(tmp_path, capfd):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=8)
    path = tmp_path / "corpus.txt"
    path.write_text("a b " * 40)
    assert token_windows(tokenizer, str(path), n_tokens=64, context=8).tokens.shape == (8, 8)
    assert "Token indices sequence length" not in capfd.readouterr().err
