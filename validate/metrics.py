"""How far an artifact's next-token distributions are from the reference's, on the same tokens.

All maths in float64 on the full-vocabulary log-softmax, a block of positions at a time so that a
32k-vocabulary model scored on thousands of tokens stays within a few hundred MB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ROWS_PER_BLOCK = 256


@dataclass(frozen=True)
class Scores:
    mean_kld: float
    median_kld: float
    p99_kld: float
    max_kld: float
    same_top1: float  # fraction of positions whose argmax agrees, 0..1
    ppl_reference: float
    ppl: float
    ppl_ratio: float
    rms_delta_p: float  # RMS of p(artifact, true token) − p(reference, true token)
    positions: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def per_position(ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position KLD(ref‖artifact), top-1 agreement, and both log-probabilities of the true token.

    `ref_logits` and `logits` are [positions, vocab]; `targets[i]` is the token that followed position i.
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logits shapes differ: reference {ref_logits.shape}, artifact {logits.shape}")
    if ref_logits.shape[0] != targets.shape[0]:
        raise ValueError("one target token per position is needed")
    kld, agree, ref_lp, art_lp = [], [], [], []
    for start in range(0, len(targets), ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        ref = log_softmax(ref_logits[rows])
        art = log_softmax(logits[rows])
        kld.append(np.sum(np.exp(ref) * (ref - art), axis=-1))
        agree.append(ref.argmax(-1) == art.argmax(-1))
        index = np.arange(ref.shape[0]), targets[rows]
        ref_lp.append(ref[index])
        art_lp.append(art[index])
    return {
        # A KLD can come out a hair below zero from rounding; it is zero.
        "kld": np.maximum(np.concatenate(kld), 0.0),
        "same_top1": np.concatenate(agree),
        "ref_logprob": np.concatenate(ref_lp),
        "logprob": np.concatenate(art_lp),
    }


def summarize(positions: dict[str, np.ndarray]) -> Scores:
    kld = positions["kld"]
    ref_lp, art_lp = positions["ref_logprob"], positions["logprob"]
    ppl_reference = float(np.exp(-ref_lp.mean()))
    ppl = float(np.exp(-art_lp.mean()))
    delta_p = np.exp(art_lp) - np.exp(ref_lp)
    return Scores(
        mean_kld=float(kld.mean()),
        median_kld=float(np.median(kld)),
        p99_kld=float(np.percentile(kld, 99)),
        max_kld=float(kld.max()),
        same_top1=float(positions["same_top1"].mean()),
        ppl_reference=ppl_reference,
        ppl=ppl,
        ppl_ratio=ppl / ppl_reference,
        rms_delta_p=float(np.sqrt(np.mean(delta_p**2))),
        positions=int(kld.shape[0]),
    )


def compare(ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> tuple[Scores, np.ndarray]:
    """Scores of an artifact against the reference, and the per-position KLD (for plots)."""
    positions = per_position(ref_logits, logits, targets)
    return summarize(positions), positions["kld"]
