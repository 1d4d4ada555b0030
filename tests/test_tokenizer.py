"""The tokenizer check on hand-made probes: identical ids, differences a known rule explains (which only strict
fails), and unexplained ones, named by their first differing token."""

from __future__ import annotations

import re

from siliconvert.validate.tokenizer import (
    KNOWN_RULES,
    Probe,
    SourceRules,
    TokenizerProbes,
    check_tokenizer,
    describe,
    first_difference,
)

PROBES = TokenizerProbes([
    Probe("fixed string 0", "Hello", [5, 6], {("no-space-prefix",): (" Hello", [9, 6])}),
    Probe("fixed string 1", "world", [7], {("no-space-prefix",): (" world", [8])}),
    Probe("corpus", "abc", [1, 2, 3], {}),
])


def artifact_ids(**by_text: list[int]) -> list[list[int]]:
    """The artifact's ids for PROBES.artifact_texts: the source's, but where given."""
    source = {"Hello": [5, 6], "world": [7], "abc": [1, 2, 3], " Hello": [9, 6], " world": [8]}
    return [by_text.get(text, source[text]) for text in PROBES.artifact_texts]


def test_the_artifact_tokenizes_each_text_once_probes_first():
    assert PROBES.artifact_texts == ["Hello", "world", "abc", " Hello", " world"]


def test_identical_ids_pass():
    check = check_tokenizer(PROBES, artifact_ids(), strict=True)
    assert (check["identical"], check["unexplained"], check["known"], check["passed"]) == (3, 0, {}, True)
    assert describe(check) == "3 of 3 texts identical"


def test_a_difference_a_known_rule_explains_warns_and_fails_only_when_strict():
    # the artifact gives for "Hello" what the source gives for " Hello": no-space-prefix
    ids = artifact_ids(Hello=[9, 6], world=[8])
    lenient = check_tokenizer(PROBES, ids, strict=False)
    assert lenient["passed"] and lenient["identical"] == 1 and lenient["unexplained"] == 0
    assert lenient["known"]["no-space-prefix"]["probes"] == 2
    assert lenient["known"]["no-space-prefix"]["example"].startswith("fixed string 0 ('Hello'): token 0 is [9]")
    assert not check_tokenizer(PROBES, ids, strict=True)["passed"]
    assert describe(lenient) == "1 of 3 texts identical; 2 by known rule no-space-prefix"


def test_an_unexplained_difference_fails_and_is_shown():
    check = check_tokenizer(PROBES, artifact_ids(abc=[1, 2, 4]), strict=False)
    assert not check["passed"] and check["unexplained"] == 1
    assert check["differences"] == ["corpus ('abc'): token 2 is [4] but the source tokenizer gives [3]"]
    assert describe(check) == "2 of 3 texts identical; 1 differ"


def test_a_shorter_tokenization_differs_where_it_ends():
    probe = Probe("corpus", "abc", [1, 2, 3], {})
    assert first_difference(probe, [1, 2]) == "corpus ('abc'): token 2 is [] but the source tokenizer gives [3]"


def test_the_strip_rule_drops_on_the_artifacts_side_the_whitespace_a_flagged_token_takes():
    strip = {rule.name: rule for rule in KNOWN_RULES}["added-token-strip"]
    source = SourceRules([], re.compile("<r>|<l>|<n>"), lstrip=frozenset({"<l>"}), rstrip=frozenset({"<r>"}))
    assert strip.rewrite("a <r> \n b <l>c <n> d", source) == ("a <r> \n b <l>c <n> d", "a <r>b<l>c <n> d")
    assert strip.rewrite("a <r>b <n> c", source) is None  # nothing to take: the rule does not touch the text
    assert not strip.applies(SourceRules([], re.compile("<n>"), lstrip=frozenset(), rstrip=frozenset()))


def test_a_difference_two_rules_explain_together_counts_for_both():
    probe = Probe("added tokens in text", "x <r> y", [1, 2, 3], {
        ("no-space-prefix",): (" x <r> y", [1, 2, 3]), ("added-token-strip",): ("x <r>y", [1, 2, 3]),
        ("no-space-prefix", "added-token-strip"): (" x <r>y", [1, 2, 3])})
    probes = TokenizerProbes([probe])
    by_text = {"x <r> y": [4, 2, 5, 3], " x <r> y": [1, 2, 5, 3], "x <r>y": [4, 2, 3], " x <r>y": [1, 2, 3]}
    check = check_tokenizer(probes, [by_text[text] for text in probes.artifact_texts], strict=False)
    assert check["passed"] and check["unexplained"] == 0
    assert {name: k["probes"] for name, k in check["known"].items()} == {"no-space-prefix": 1, "added-token-strip": 1}
    wrong = {**by_text, " x <r>y": [1, 2, 6]}  # the rules together leave a difference: unexplained
    assert not check_tokenizer(probes, [wrong[text] for text in probes.artifact_texts], strict=False)["passed"]
