"""Gates: the recipe's thresholds, applied to one artifact's scores. A failure names everything."""

from __future__ import annotations

from dataclasses import dataclass

from siliconvert.recipe import Gates
from siliconvert.validate.router import describe_router
from siliconvert.validate.score import ArtifactScore, describe_kv_cache

# gate key → (metric in Scores, "max" or "min")
LIMITS = {
    "max_mean_kld": ("mean_kld", "max"),
    "max_p99_kld": ("p99_kld", "max"),
    "min_same_top1": ("same_top1", "min"),
    "max_ppl_ratio": ("ppl_ratio", "max"),
    "max_rms_delta_p": ("rms_delta_p", "max"),
}


@dataclass(frozen=True)
class GateFailure:
    metric: str
    value: float | bool | None
    limit: float | bool | None
    message: str


def check(result: ArtifactScore, gates: Gates) -> list[GateFailure]:
    """Every gate the artifact fails. A tokenizer that differs from the source other than by a known rule (or at
    all, under validate.tokenizer: strict), or a KV cache that moves the artifact further from its
    no-cache pass than quantization's own error allows, fails regardless of the recipe: no KLD explains those
    away."""
    name = f"{result.artifact.format} {result.artifact.quant}"
    failures = []
    for key, (metric, direction) in LIMITS.items():
        limit = getattr(gates, key)
        if limit is None:
            continue
        value = getattr(result.scores, metric)
        # written as "not within": a value that is not a number (an artifact whose logits overflowed) fails
        if not ((value <= limit) if direction == "max" else (value >= limit)):
            relation = ">" if direction == "max" else "<"
            failures.append(GateFailure(metric, value, limit, f"{name}: {metric} {value:.4g} {relation} {limit}"))
    tokenizer = result.tokenizer
    if tokenizer["unexplained"]:
        failures.append(GateFailure("tokenizer_match", False, True, f"{name}: tokenizer differs from the source on "
                                    f"{tokenizer['unexplained']} texts: {tokenizer['differences'][0]}"))
    elif not tokenizer["passed"]:  # only known rules differ, and the recipe asks for validate.tokenizer: strict
        rules = ", ".join(tokenizer["known"])
        failures.append(GateFailure("tokenizer_match", False, True, f"{name}: tokenizer differs from the source by "
                                    f"known rules ({rules}; validate.tokenizer: strict): {result.tokenizer_mismatch}"))
    router = result.router
    if (gates.min_router_agreement is not None and router is not None and router["measured"]
            and router["same_experts"] < gates.min_router_agreement):
            failures.append(GateFailure(
                "router_agreement", router["same_experts"], gates.min_router_agreement,
                f"{name}: routers chose the reference's experts for {router['same_experts']:.4g} of tokens < "
                f"{gates.min_router_agreement}: {describe_router(router)}"))
    kv = result.kv_cache
    if kv["consistent"] is False:  # None: not measured (the report says why), which fails nothing
        failures.append(GateFailure("kv_cache", kv["excess_kld"], kv["limit_kld"],
                                    f"{name}: decoding through the KV cache is worse than the no-cache pass: "
                                    f"{describe_kv_cache(kv)}"))
    return failures
