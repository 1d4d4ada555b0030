"""Which experts a mixture of experts chose, and how often an artifact's router chose the reference's.

A quantized router that picks other experts sends a token through other weights: its KLD shows that late and
mixed with everything else, the agreement shows it directly. Each runner reports the top-k expert ids of every
sparse layer for every token of the scored windows (Runner.expert_choices); the reference records them from
transformers' own router modules while it runs (`RouterRecorder`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

if TYPE_CHECKING:
    import torch


class LayerAgreement(TypedDict):
    layer: int
    same_experts: float  # fraction of tokens whose chosen set equals the reference's
    overlap: float  # mean fraction of the reference's experts the artifact also chose


class RouterAgreement(TypedDict):
    """report.json's `router_agreement` for one artifact of a mixture-of-experts model."""

    measured: bool
    same_experts: float | None  # over every sparse layer and token
    overlap: float | None
    worst_layer: int | None  # the layer with the lowest same_experts
    layers: list[LayerAgreement]
    reason: str | None  # why not measured


def router_agreement(reference: np.ndarray, artifact: np.ndarray | None, sparse_layers: list[int],
                     reason: str | None = None) -> RouterAgreement:
    """Compare chosen expert ids [windows, length, sparse layers, k] (any order within a token)."""
    if artifact is None:
        return RouterAgreement(measured=False, same_experts=None, overlap=None, worst_layer=None, layers=[],
                               reason=reason or "the runtime does not show its router's choices")
    if artifact.shape != reference.shape:
        raise ValueError(f"expert choices of shape {artifact.shape}, the reference's are {reference.shape}")
    ref, art = np.sort(reference, axis=-1), np.sort(artifact, axis=-1)
    same = (ref == art).all(axis=-1)  # [windows, length, layers]
    overlap = (ref[..., :, None] == art[..., None, :]).any(axis=-1).mean(axis=-1)
    layers = [LayerAgreement(layer=layer, same_experts=float(same[..., i].mean()),
                             overlap=float(overlap[..., i].mean())) for i, layer in enumerate(sparse_layers)]
    worst = min(layers, key=lambda entry: entry["same_experts"])["layer"] if layers else None
    return RouterAgreement(measured=True, same_experts=float(same.mean()), overlap=float(overlap.mean()),
                           worst_layer=worst, layers=layers, reason=None)


def describe_router(agreement: RouterAgreement) -> str:
    """e.g. "same experts for 97.1% of tokens (overlap 98.6%; worst layer 3: 91.0%)"."""
    worst = next(entry for entry in agreement["layers"] if entry["layer"] == agreement["worst_layer"])
    return (f"same experts for {agreement['same_experts']:.1%} of tokens (overlap {agreement['overlap']:.1%}; "
            f"worst layer {worst['layer']}: {worst['same_experts']:.1%})")


class RouterRecorder:
    """Records the experts transformers' router modules choose, window by window and layer by layer.

    transformers' routers (Qwen3-MoE's and Mixtral's TopKRouter, `mlp.gate` of each sparse layer; gpt-oss's
    `mlp.router`; Granite MoE's `block_sparse_moe.router`; Gemma 4's layer `router`) return
    (logits, weights, expert ids); an older router that is a plain linear layer returns the logits, whose top k
    are the chosen experts (softmax keeps the order). Attach it to the model before it runs (as
    streamed_logits' `prepare`); calls arrive in window order within each layer."""

    def __init__(self, sparse_layers: list[int], used: int) -> None:
        self.sparse_layers = sparse_layers
        self.used = used
        self.calls: dict[int, list[np.ndarray]] = {layer: [] for layer in sparse_layers}

    def attach(self, model: Any) -> None:
        for layer in self.sparse_layers:
            # the router is `mlp.gate`, `mlp.router` (gpt-oss), `block_sparse_moe.router` (Granite MoE) or the
            # layer's own `router` beside its dense MLP (Gemma 4)
            block = model.model.layers[layer]
            mlp = block.mlp if hasattr(block, "mlp") else block.block_sparse_moe
            router = block.router if hasattr(block, "router") else mlp.gate if hasattr(mlp, "gate") else mlp.router
            router.register_forward_hook(lambda module, args, output, layer=layer: self._record(layer, output))

    def _record(self, layer: int, output: torch.Tensor | tuple) -> None:
        ids = output[-1] if isinstance(output, tuple) else output.topk(self.used, dim=-1).indices
        self.calls[layer].append(ids.reshape(-1, self.used).to("cpu").numpy().astype(np.int16))

    def choices(self, windows: int, length: int) -> np.ndarray:
        """Expert ids [windows, length, sparse layers, k] of the last `windows` calls of each layer."""
        per_layer = [np.stack(self.calls[layer][-windows:]).reshape(windows, length, self.used)
                     for layer in self.sparse_layers]
        return np.stack(per_layer, axis=2)
