"""The tokenizer check: does the artifact's own tokenizer give the source's token ids, on every kind of text?

A GGUF carries a vocabulary llama.cpp reads; MLX and Core ML folders ship the source's tokenizer files, and
the check proves those load and agree. The texts (`probe_texts`): the whole validation corpus, the fixed
strings, a stress list (whitespace runs, leading and trailing spaces, digits, punctuation runs, CJK, emoji,
byte-fallback characters, the issue cases that once differed), every special and added token, and the
rendered chat template. Special tokens written in the text are read as those tokens on both sides, as a chat
prompt is.

Where a runtime cannot express the source's rule, a difference is classified as a known rule (`KNOWN_RULES`):
the rule rewrites the text, and the difference is that rule's only if the rewrite gives exactly the artifact's
ids. Where several rules touch one text, they are also tried together, and the difference counts for each. A
known rule is a warning, or a failure under `validate.tokenizer: strict`; any other difference fails.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

from siliconvert.convert.gguf_vocab import pipeline_steps
from siliconvert.corpus import PROBE_STRINGS

# The places a converted vocabulary goes wrong beyond the fixed strings.
STRESS_STRINGS = (
    "\n\n   global", "def square(x):\n    return", " leading space and  double", "  two leading",  # once differed
    "a  b   c    d     e", "        eight", "x\n    y\n        z\n", "\t\tdouble tab", "\t \t mixed \t",
    "\n", "\n\n\n", "\r\n", "line\r\nwindows\r\n", " \n \n ", "trailing  ", "trailing\n\n", " ", "   ",
    " a", "  a", "a ", "0", "12", "123", "1234", "123456789012", "3.14159", "1,000,000", "v1.2.3", "٣٤٥ ½ ²",
    "!!!???...", "---===+++", "((([[[{{{", "'''\"\"\"```", "->=><=!=", "I'm you're we'll they'VE",
    "中文字符测试", "日本語のひらがなとカタカナ", "한국어 텍스트", "🙂", "👍🏽👨‍👩‍👧🇫🇷", "emoji🚀in🦙words",
    "ꙮ 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ ⅋", "zero\u200bwidth\u00a0nbsp", "cafe\u0301 n\u0303", "\u00e9\u0301",
)
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": " Two  spaces\n"}]
SHOWN_DIFFERENCES = 5  # unexplained differences kept in the report (their total is always given)


@dataclass(frozen=True)
class SourceRules:
    """What the source tokenizer says that a known rule depends on."""

    steps: list[dict]  # its normalizer and pre-tokenizer steps, as tokenizer.json spells them
    added: re.Pattern | None  # every added token, longest first, as both sides match them
    lstrip: frozenset[str]  # added tokens that take the whitespace before them (tokenizers' `lstrip`)
    rstrip: frozenset[str]  # added tokens that take the whitespace after them (`rstrip`)


@dataclass(frozen=True)
class KnownRule:
    """A rule of an artifact's runtime that the source tokenizer does not follow, and llama.cpp cannot avoid."""

    name: str
    description: str  # what the report and the model card say
    formats: tuple[str, ...]  # the artifacts whose runtime follows it
    # whether the source has the rule's counterpart: only then can a difference be that rule's
    applies: Callable[[SourceRules], bool]
    # text → (text for the source, text for the artifact) that make the rule explicit, or None where the rule
    # does not touch the text
    rewrite: Callable[[str, SourceRules], tuple[str, str] | None]


def _space_prefix(text: str, source: SourceRules) -> tuple[str, str] | None:
    """llama.cpp's SentencePiece tokenizer with add_space_prefix puts "▁" before every piece of text that starts
    the input or follows an added token; Metaspace's prepend_scheme "always" too, except where that text already
    begins with a space. Spelled out as a space on the source's side, the two tokenize alike."""
    added = source.added
    rewritten, position = (" " if text.startswith(" ") else ""), 0
    for match in added.finditer(text) if added else ():
        follows_text = match.end() < len(text) and not added.match(text, match.end())
        rewritten += text[position:match.end()] + (" " if follows_text else "")
        position = match.end()
    rewritten += text[position:]
    return None if rewritten == text else (rewritten, text)


def _no_space_prefix(text: str, source: SourceRules) -> tuple[str, str] | None:
    """Metaspace's prepend_scheme "first" puts "▁" before an input that begins with neither a space nor a special
    token; llama.cpp without add_space_prefix puts none. Spelled out as a space on the artifact's side, the two
    tokenize alike."""
    if not text or text.startswith(" ") or (source.added and source.added.match(text)):
        return None
    return text, " " + text


def _composed(text: str, source: SourceRules) -> tuple[str, str] | None:
    """An NFC normalizer composes "e" + U+0301 into "é" before the source tokenizes; llama.cpp's BPE does not."""
    composed = unicodedata.normalize("NFC", text)
    return None if composed == text else (text, composed)


def _stripped(text: str, source: SourceRules) -> tuple[str, str] | None:
    """An added token with `rstrip` (`lstrip`) takes the whitespace after (before) it as part of its match, so the
    source never tokenizes that whitespace; llama.cpp reads no such flag from a GGUF, and keeps it. Dropped on the
    artifact's side, the two tokenize alike."""
    if source.added is None or not (source.lstrip or source.rstrip):
        return None
    kept, position = [], 0
    for match in source.added.finditer(text):
        before = text[position:match.start()]
        kept += [before.rstrip() if match.group() in source.lstrip else before, match.group()]
        position = match.end()
        if match.group() in source.rstrip:
            position += len(text[position:]) - len(text[position:].lstrip())
    rewritten = "".join(kept) + text[position:]
    return None if rewritten == text else (text, rewritten)


KNOWN_RULES = (
    KnownRule("space-prefix", "inputs, and text after a special or added token, that begin with a space: llama.cpp "
              "adds `▁` before that space, the source does not (Metaspace prepend_scheme \"always\")", ("gguf",),
              lambda source: _has(source.steps, "Metaspace", prepend_scheme="always"), _space_prefix),
    KnownRule("no-space-prefix", "inputs that begin with neither a space nor a special token: the source adds `▁`, "
              "llama.cpp does not (Metaspace prepend_scheme \"first\"; chat prompts, which begin with a special "
              "token, agree)", ("gguf",), lambda source: _has(source.steps, "Metaspace", prepend_scheme="first"),
              _no_space_prefix),
    KnownRule("nfc", "text not in Unicode NFC: the source composes it first, llama.cpp does not normalize",
              ("gguf",), lambda source: _has(source.steps, "NFC"), _composed),
    KnownRule("added-token-strip", "whitespace after an added token marked `rstrip` (or before one marked `lstrip`): "
              "the source drops it, llama.cpp keeps it (it reads no such flag from a GGUF, and sets Phi-3's only in "
              "a file whose general.name contains \"phi3\" or \"phi-3\")", ("gguf",),
              lambda source: bool(source.lstrip or source.rstrip), _stripped),
)


@dataclass(frozen=True)
class Probe:
    label: str  # where the text comes from: "corpus", "fixed string 3", "stress string 12", "added token '<s>'"
    text: str
    source_ids: list[int]
    # rule names, one or several applied together → (text the artifact tokenizes, the ids the source gives for
    # the rules' rewrite)
    rewrites: dict[tuple[str, ...], tuple[str, list[int]]]


@dataclass(frozen=True)
class TokenizerProbes:
    """The texts, the source's ids for each, and what each known rule would make of them."""

    probes: list[Probe]

    @property
    def artifact_texts(self) -> list[str]:
        """Every text the artifact tokenizes (probes, then rewrites), each once, in a stable order."""
        texts = [p.text for p in self.probes] + [text for p in self.probes for text, _ in p.rewrites.values()]
        return list(dict.fromkeys(texts))


class KnownDifference(TypedDict):
    description: str
    probes: int  # probes whose difference this rule explains
    example: str  # the first of them, with its first differing position


class TokenizerCheck(TypedDict):
    """The check's outcome (report.json's `tokenizer`)."""

    probes: int
    identical: int
    known: dict[str, KnownDifference]  # rule name → the probes it explains
    unexplained: int
    differences: list[str]  # the first SHOWN_DIFFERENCES unexplained ones
    strict: bool  # validate.tokenizer: strict (known rules fail too)
    passed: bool


def probe_texts(tokenizer, corpus_text: str) -> list[tuple[str, str]]:
    """(label, text) of every text the check tokenizes, for a transformers tokenizer."""
    texts = [("corpus", corpus_text)]
    texts += [(f"fixed string {i}", s) for i, s in enumerate(PROBE_STRINGS)]
    texts += [(f"stress string {i}", s) for i, s in enumerate(STRESS_STRINGS)]
    added = sorted({t.content for t in tokenizer.added_tokens_decoder.values()})
    texts += [(f"added token {token!r}", token) for token in added]
    if added:
        texts.append(("added tokens in text", "x " + " y".join(added) + "z\n"))
        # a space on both sides of each: what an `lstrip` or `rstrip` flag takes
        texts.append(("added tokens between spaces", " ".join(["x", *added, "z"])))
    chat = _rendered_chat(tokenizer)
    if chat is not None:
        texts.append(("chat template", chat))
    return texts


def tokenizer_probes(tokenizer, corpus_text: str, fmt: str) -> TokenizerProbes:
    """The source's ids for every probe text, and for each known rule of `fmt`'s runtime that the source's
    pipeline has a counterpart of and that touches the text."""
    source = source_rules(tokenizer)
    rules = [rule for rule in KNOWN_RULES if fmt in rule.formats and rule.applies(source)]

    def ids(text: str) -> list[int]:
        # verbose=False: the corpus is longer than the model's positions, which is no concern here
        return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))

    probes = []
    for label, text in probe_texts(tokenizer, corpus_text):
        rewrites = {}
        touching = [rule for rule in rules if rule.rewrite(text, source) is not None]
        # each rule alone, then all of them together (text at the start after an rstrip token, say)
        for together in [[rule] for rule in touching] + ([touching] if len(touching) > 1 else []):
            source_text, artifact_text = _rewrite(together, text, source)
            rewrites[tuple(rule.name for rule in together)] = (artifact_text, ids(source_text))
        probes.append(Probe(label, text, ids(text), rewrites))
    return TokenizerProbes(probes)


def source_rules(tokenizer) -> SourceRules:
    """What a transformers tokenizer says that the known rules depend on."""
    decoder = tokenizer.added_tokens_decoder.values()
    contents = sorted({t.content for t in decoder if t.content}, key=len, reverse=True)
    added = re.compile("|".join(map(re.escape, contents))) if contents else None  # longest first, as both match
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a tokenizer without one has no rules to name
    pipeline = json.loads(backend.to_str()) if backend is not None else {}
    steps = [*pipeline_steps(pipeline.get("normalizer"), "normalizers"),
             *pipeline_steps(pipeline.get("pre_tokenizer"), "pretokenizers")]
    return SourceRules(steps, added, lstrip=frozenset(t.content for t in decoder if t.content and t.lstrip),
                       rstrip=frozenset(t.content for t in decoder if t.content and t.rstrip))


def _rewrite(rules: list[KnownRule], text: str, source: SourceRules) -> tuple[str, str]:
    """(text for the source, text for the artifact) with every rule of `rules` made explicit, in turn."""
    source_text, artifact_text = text, text
    for rule in rules:
        on_source, on_artifact = rule.rewrite(source_text, source), rule.rewrite(artifact_text, source)
        source_text = on_source[0] if on_source else source_text
        artifact_text = on_artifact[1] if on_artifact else artifact_text
    return source_text, artifact_text


def check_tokenizer(probes: TokenizerProbes, artifact_ids: Sequence[list[int]], strict: bool) -> TokenizerCheck:
    """Compare the artifact's ids (aligned with `probes.artifact_texts`) with the source's, probe by probe."""
    got = dict(zip(probes.artifact_texts, artifact_ids, strict=True))
    rules = {rule.name: rule for rule in KNOWN_RULES}
    known: dict[str, KnownDifference] = {}
    identical, unexplained, differences = 0, 0, []
    for probe in probes.probes:
        ids = got[probe.text]
        if ids == probe.source_ids:
            identical += 1
            continue
        where = first_difference(probe, ids)
        names = next((names for names, (text, want) in probe.rewrites.items() if got[text] == want), None)
        if names is None:
            unexplained += 1
            if len(differences) < SHOWN_DIFFERENCES:
                differences.append(where)
        for rule in names or ():
            if rule in known:
                known[rule]["probes"] += 1
            else:
                known[rule] = KnownDifference(description=rules[rule].description, probes=1, example=where)
    return TokenizerCheck(probes=len(probes.probes), identical=identical, known=known, unexplained=unexplained,
                          differences=differences, strict=strict,
                          passed=unexplained == 0 and not (strict and known))


def first_difference(probe: Probe, ids: list[int]) -> str:
    """The probe and its first differing token, in one line."""
    want = probe.source_ids
    position = next((i for i, (a, b) in enumerate(zip(want, ids, strict=False)) if a != b), min(len(want), len(ids)))
    return (f"{probe.label} ({probe.text[:24]!r}): token {position} is {ids[position:position + 1]} "
            f"but the source tokenizer gives {want[position:position + 1]}")


def describe(check: TokenizerCheck) -> str:
    """The check in words, e.g. "91 of 93 texts identical; 2 by known rule space-prefix"."""
    parts = [f"{check['identical']} of {check['probes']} texts identical"]
    parts += [f"{k['probes']} by known rule {name}" for name, k in check["known"].items()]
    if check["unexplained"]:
        parts.append(f"{check['unexplained']} differ")
    return "; ".join(parts)


def _has(steps: list[dict], kind: str, **settings: str) -> bool:
    return any(s["type"] == kind and all(s.get(k) == v for k, v in settings.items()) for s in steps)


def _rendered_chat(tokenizer) -> str | None:
    """The chat template applied to a short conversation (without the system turn where it refuses one)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for messages in (CHAT, CHAT[1:]):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates raise what they like (jinja's TemplateError, ValueError)
            continue
    return None
