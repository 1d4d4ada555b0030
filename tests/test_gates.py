"""The gates on one artifact's scores: each recipe limit, the tokenizer, the routers and the KV cache, each failure
named with its value and limit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from siliconvert.artifacts import Artifact
from siliconvert.recipe import Gates
from siliconvert.validate.gates import check
from siliconvert.validate.router import router_agreement

SCORES = SimpleNamespace(mean_kld=0.02, p99_kld=0.3, same_top1=0.9, ppl_ratio=1.01, rms_delta_p=0.01)
MATCHING_TOKENIZER = {"passed": True, "unexplained": 0, "known": [], "differences": []}
CONSISTENT_CACHE = {"consistent": True, "mean_kld": 0.001, "excess_kld": -0.0001, "limit_kld": 0.005}


def result_with(**changes) -> SimpleNamespace:
    """What check() reads of an ArtifactScore, passing every gate unless changed."""
    fields = {"artifact": Artifact("gguf", "Q4_K_M", Path("x.gguf")), "scores": SCORES,
              "tokenizer": MATCHING_TOKENIZER, "tokenizer_mismatch": None, "router": None,
              "kv_cache": CONSISTENT_CACHE}
    return SimpleNamespace(**(fields | changes))


def test_limits_compare_in_their_direction_and_unset_limits_check_nothing():
    assert check(result_with(), Gates()) == []
    assert check(result_with(), Gates(max_mean_kld=0.02, min_same_top1=0.9)) == []  # at the limit passes
    failures = check(result_with(), Gates(max_mean_kld=0.01, min_same_top1=0.95, max_ppl_ratio=2.0))
    assert [(f.metric, f.value, f.limit) for f in failures] == [("mean_kld", 0.02, 0.01), ("same_top1", 0.9, 0.95)]
    assert [f.message for f in failures] == ["gguf Q4_K_M: mean_kld 0.02 > 0.01", "gguf Q4_K_M: same_top1 0.9 < 0.95"]


def test_an_unexplained_tokenizer_difference_fails_without_any_limit():
    tokenizer = {"passed": False, "unexplained": 3, "known": [], "differences": ["'a b': id 7 where the source has 8"]}
    (failure,) = check(result_with(tokenizer=tokenizer), Gates())
    assert failure.metric == "tokenizer_match" and failure.value is False
    assert failure.message == "gguf Q4_K_M: tokenizer differs from the source on 3 texts: 'a b': id 7 where the " \
                              "source has 8"


def test_a_known_rule_fails_only_when_strict_said_so():
    strict = {"passed": False, "unexplained": 0, "known": ["space prefix"], "differences": []}
    (failure,) = check(result_with(tokenizer=strict, tokenizer_mismatch="at text 2"), Gates())
    assert "known rules (space prefix; validate.tokenizer: strict): at text 2" in failure.message
    lenient = strict | {"passed": True}
    assert check(result_with(tokenizer=lenient), Gates()) == []


def test_router_agreement_is_gated_only_where_measured_and_asked_for():
    reference = np.array([[[[0, 1]], [[1, 2]]]])  # 1 window, 2 tokens, 1 sparse layer, top-2
    half = router_agreement(reference, np.array([[[[0, 1]], [[1, 3]]]]), [1])
    (failure,) = check(result_with(router=half), Gates(min_router_agreement=0.9))
    assert (failure.metric, failure.value, failure.limit) == ("router_agreement", 0.5, 0.9)
    assert failure.message.endswith("same experts for 50.0% of tokens (overlap 75.0%; worst layer 1: 50.0%)")
    assert check(result_with(router=half), Gates()) == []
    unmeasured = router_agreement(reference, None, [1], "no callback")
    assert check(result_with(router=unmeasured), Gates(min_router_agreement=0.9)) == []


def test_a_drifting_cache_fails_and_an_unmeasured_one_does_not():
    drifting = {"consistent": False, "checked_tokens": 17, "first_mismatch": 3, "mean_kld": 0.8, "same_top1": 0.5,
                "decode_kld": 0.84, "no_cache_kld": 0.04, "excess_kld": 0.8, "limit_kld": 0.011}
    (failure,) = check(result_with(kv_cache=drifting), Gates())
    assert (failure.metric, failure.value, failure.limit) == ("kv_cache", 0.8, 0.011)
    assert failure.message.endswith(
        "decoding through the KV cache is worse than the no-cache pass: KLD to the reference 0.84 decoding, 0.04 "
        "without the cache (+0.8, limit 0.011) over 17 steps; the two paths differ by KLD 0.8 (first different "
        "token at step 3)")
    unmeasured = {"consistent": None, "checked_tokens": 0, "first_mismatch": None, "mean_kld": None, "limit_kld": None}
    assert check(result_with(kv_cache=unmeasured), Gates()) == []


def test_a_score_that_is_not_a_number_fails_every_gate_it_meets():
    """An artifact whose logits overflow scores NaN; a comparison with NaN is false either way, so a gate written
    as "fail when above" would pass it."""
    broken = SimpleNamespace(mean_kld=float("nan"), p99_kld=float("inf"), same_top1=float("nan"), ppl_ratio=1.0,
                             rms_delta_p=0.01)
    failures = check(result_with(scores=broken), Gates(max_mean_kld=0.05, max_p99_kld=1.0, min_same_top1=0.9))
    assert [f.metric for f in failures] == ["mean_kld", "p99_kld", "same_top1"]
    assert failures[0].message == "gguf Q4_K_M: mean_kld nan > 0.05"
