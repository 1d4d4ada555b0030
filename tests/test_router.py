"""Router agreement: expert choices compared as sets, per layer and overall, and said in words."""

from __future__ import annotations

import numpy as np
import pytest

from siliconvert.validate.router import describe_router, router_agreement


def test_router_agreement_counts_sets_not_order() -> None:
    reference = np.array([[[[0, 1], [2, 3]], [[1, 2], [0, 3]]]])  # 1 window, 2 tokens, 2 layers, top-2
    same_sets = reference[..., ::-1]
    assert router_agreement(reference, same_sets, [0, 2])["same_experts"] == 1.0
    other = reference.copy()
    other[0, 1, 1] = [0, 1]  # token 1, second sparse layer: one of two experts differs
    agreement = router_agreement(reference, other, [0, 2])
    assert agreement["same_experts"] == 0.75 and agreement["overlap"] == 0.875
    assert agreement["worst_layer"] == 2 and agreement["layers"][1]["same_experts"] == 0.5
    unmeasured = router_agreement(reference, None, [0, 2], "no callback")
    assert not unmeasured["measured"] and unmeasured["reason"] == "no callback"


def test_router_agreement_refuses_choices_of_another_shape() -> None:
    reference = np.zeros((1, 2, 2, 2), dtype=np.int16)
    with pytest.raises(ValueError, match="shape"):
        router_agreement(reference, reference[:, :1], [0, 1])


def test_describe_router_names_the_worst_layer() -> None:
    reference = np.array([[[[0, 1], [2, 3]], [[1, 2], [0, 3]]]])
    other = reference.copy()
    other[0, 1, 1] = [0, 1]
    assert describe_router(router_agreement(reference, other, [0, 2])) == \
        "same experts for 75.0% of tokens (overlap 87.5%; worst layer 2: 50.0%)"
