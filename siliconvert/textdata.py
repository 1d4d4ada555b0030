"""Text that ships with Python, split once into a training part and a held-out part.

No hub is reachable, so the demo checkpoints learn from the interpreter's own documentation
(`pydoc_data.topics`, a few hundred KB of English prose and code). Every tenth topic, in sorted
order, is held out, less the paragraphs it shares with other topics: the models never see it, and it is
the built-in validation corpus (`validate.corpus: builtin`). The text comes with the interpreter, so it
differs a little between Python versions.
"""

from __future__ import annotations

from functools import lru_cache

HELDOUT_EVERY = 10


@lru_cache(maxsize=1)
def _split() -> tuple[str, str]:
    from pydoc_data.topics import topics

    train, heldout = [], []
    for index, key in enumerate(sorted(topics)):
        (heldout if index % HELDOUT_EVERY == 0 else train).append(topics[key].strip())
    seen = {paragraph for topic in train for paragraph in topic.split("\n\n")}  # topics repeat some paragraphs
    heldout = ["\n\n".join(p for p in topic.split("\n\n") if p not in seen) for topic in heldout]
    return "\n\n".join(train), "\n\n".join(heldout)


def training_text() -> str:
    """The documentation topics the demo models are trained on."""
    return _split()[0]


def heldout_text() -> str:
    """Every tenth topic, less paragraphs found in the others: text never trained on (~30 KB)."""
    return _split()[1]
