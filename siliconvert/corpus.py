"""The token windows every runner is scored on: one tokenization, by the source tokenizer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siliconvert.errors import CheckpointError, RecipeError

# Strings whose tokenization every artifact must reproduce exactly: the usual places where a
# converted vocabulary goes wrong (spaces, byte fallback, merges over digits, non-Latin scripts).
PROBE_STRINGS = (
    "Hello world",
    " leading space and  double  spaces",
    "def square(x):\n    return x ** 2\n",
    "if (a[i] != b[j]) { return -1; }",
    "naïve café — “quoted” déjà vu",
    "日本語のテキストと中文",
    "Привет, мир!",
    "emoji 🙂🚀 and ✓",
    "numbers 1234567 3.14159 -42 0x1F",
    "\ttab\nnewline\n\ntwo newlines",
    "UPPER lower MiXeD CamelCase snake_case",
)


@dataclass(frozen=True)
class Windows:
    tokens: np.ndarray  # [windows, context] token ids
    corpus: str  # how the report names the text
    digest: str  # hash of the token ids (cache key)
    probe_text: str  # the whole corpus, which the tokenizer check also tokenizes (validate/tokenizer.py)

    @property
    def targets(self) -> np.ndarray:
        """The token each scored position should predict: positions 0..C-2 predict 1..C-1."""
        return self.tokens[:, 1:]


def load_text(corpus: str) -> tuple[str, str]:
    """(text, label) for the recipe's `validate.corpus`."""
    if corpus == "builtin":
        from siliconvert.textdata import heldout_text

        return heldout_text(), "builtin (held-out pydoc_data text)"
    path = Path(corpus).expanduser()
    if path.exists() and not path.is_file():  # a folder; a FIFO or a device would hang or never end
        raise RecipeError("cannot read the validation corpus (not a regular file)", path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read the validation corpus ({e.strerror})", path) from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"the validation corpus is not UTF-8 text (invalid byte at position {e.start})",
                          path) from None
    if not text.strip():
        raise RecipeError("the validation corpus is empty", path)
    return text, str(path)


def source_tokenizer(path: Path):
    from transformers import AutoTokenizer

    # Remote code is never run: a tokenizer that needs it is refused by transformers.
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # tokenizers, sentencepiece and transformers each raise their own types
        problem = str(e).strip().splitlines()[0][:200] if str(e).strip() else "no detail"
        raise CheckpointError(f"the tokenizer files cannot be loaded ({type(e).__name__}: {problem})",
                              path) from None


def token_windows(tokenizer, corpus: str, n_tokens: int, context: int) -> Windows:
    """Split the corpus into n_tokens // context windows of `context` tokens.

    Where the tokenizer starts sequences with BOS, every window starts with BOS, as a user's
    prompt would.
    """
    text, label = load_text(corpus)
    # verbose=False: the whole text is longer than the model's positions by design (it is cut into windows
    # below), which transformers would warn about ("Token indices sequence length is longer…").
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer.encode("a")[:1] == [bos]
    body = context - 1 if adds_bos else context
    count = n_tokens // context
    if len(ids) < count * body:
        raise RecipeError(
            f"the corpus has {len(ids)} tokens; validate.tokens={n_tokens} needs {count * body}", label
        )
    rows = [ids[i * body:(i + 1) * body] for i in range(count)]
    tokens = np.array([[bos, *row] if adds_bos else row for row in rows], dtype=np.int64)
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    return Windows(tokens, label, digest, probe_text=text)
