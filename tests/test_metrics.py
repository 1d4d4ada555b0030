"""The metric maths on hand-made logits whose answers are known in closed form."""

import numpy as np
import pytest

from siliconvert.validate.metrics import compare, log_softmax


def test_identical_logits_score_perfectly():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 17)).astype(np.float32)
    targets = rng.integers(0, 17, size=50)
    scores, kld = compare(logits, logits.copy(), targets)
    assert scores.mean_kld == pytest.approx(0, abs=1e-12) and kld.max() == pytest.approx(0, abs=1e-12)
    assert scores.same_top1 == 1.0
    assert scores.ppl_ratio == pytest.approx(1.0)
    assert scores.rms_delta_p == pytest.approx(0, abs=1e-12)


def test_kld_of_two_known_distributions():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL(p‖q) = ½ ln 2 + ½ ln(2/3)
    ref = np.log(np.array([[0.5, 0.5]]))
    art = np.log(np.array([[0.25, 0.75]]))
    scores, _ = compare(ref, art, np.array([0]))
    assert scores.mean_kld == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3), rel=1e-12)
    # target 0: p_ref = ½, p_art = ¼ → PPL ref 2, artifact 4; Δp = −¼
    assert scores.ppl_reference == pytest.approx(2.0)
    assert scores.ppl == pytest.approx(4.0)
    assert scores.ppl_ratio == pytest.approx(2.0)
    assert scores.rms_delta_p == pytest.approx(0.25)


def test_kld_is_invariant_to_a_logit_shift_but_not_to_a_swap():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    shifted = ref + 100.0
    assert compare(ref, shifted, np.array([0, 1]))[0].mean_kld == pytest.approx(0, abs=1e-12)
    swapped = ref[:, ::-1].copy()
    scores, _ = compare(ref, swapped, np.array([0, 1]))
    assert scores.mean_kld > 0.5
    assert scores.same_top1 == 0.0


def test_statistics_over_positions():
    # Position i's artifact puts weight w_i on the reference's (certain) token: KLD_i = −ln w_i.
    weights = np.array([0.9, 0.5, 0.25, 0.125])
    ref = np.log(np.array([[1 - 1e-15, 1e-15]] * 4))
    art = np.log(np.stack([weights, 1 - weights], axis=1))
    scores, kld = compare(ref, art, np.zeros(4, dtype=int))
    expected = -np.log(weights)
    np.testing.assert_allclose(kld, expected, rtol=1e-6)
    assert scores.mean_kld == pytest.approx(expected.mean(), rel=1e-6)
    assert scores.median_kld == pytest.approx(np.median(expected), rel=1e-6)
    assert scores.max_kld == pytest.approx(expected.max(), rel=1e-6)
    assert scores.same_top1 == 0.5  # w = 0.25 and 0.125 flip the argmax; w = 0.5 ties, argmax keeps 0
    assert scores.positions == 4


def test_blocks_give_the_same_answer_as_one_pass(monkeypatch):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(600, 33))
    art = ref + rng.normal(scale=0.1, size=ref.shape)
    targets = rng.integers(0, 33, size=600)
    whole, _ = compare(ref, art, targets)
    monkeypatch.setattr("siliconvert.validate.metrics.ROWS_PER_BLOCK", 7)
    blocked, _ = compare(ref, art, targets)
    assert whole == pytest.approx(blocked)


def test_log_softmax_is_stable_for_huge_logits():
    out = log_softmax(np.array([[1e4, 0.0, -1e4]], dtype=np.float32))
    assert np.isfinite(out[0, 0]) and out[0, 0] == pytest.approx(0.0)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        compare(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(2, dtype=int))
