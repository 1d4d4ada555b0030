"""Each tensor's gain to the mean KLD, measured on the model itself: its weights perturbed, one at a time.

A plan predicts mean KLD = Σ_tensors gain · r (quantize/sensitivity.py), r a tensor's relative output error under
the importance-weighted measure. The gains vary between models by far more than between roles (per-role gains
fitted on one model were 30–50× off on others) and between layers of one role (8× and 0.07× of their role's gain
on a SmolLM3 test checkpoint), so they are measured on the checkpoint being converted, on the calibration text:

- one window of the text goes through transformers' forward one decoder layer at a time (siliconvert/streamed.py);
- at each layer, after the clean hidden states went through it, each of its weights in turn (q, k, v, o, gate, up,
  down, an expert stack as one tensor; never a router) takes noise of a known relative output error: ΔW = σ ·
  rms(row) · N(0, 1), seeded, σ = √R0, its r measured exactly with the window's own importance at that input (an
  expert stack's as its experts' errors weighted by the tokens routed to each, as the costs weigh them). The
  layer runs again on its clean input with that weight, and the perturbed hidden states start a stream;
- every stream is carried through the later layers beside the clean one while each layer's weights are loaded
  once; the embedding's stream starts at the first layer, the head's noise is applied to the clean final states;
- at the head each stream's mean KLD(clean ‖ perturbed) over the window's tokens, divided by its r, is the gain.

The noise has quantization's shape (independent per weight, on the scale of its row) and R0 is a 4-bit's error:
KLD is second order in a small perturbation, so it is KLD per unit r in the range where plans choose. A tied
embedding gets the embedding's gain and the head's, each measured on its own path.

Shrink gains. A quantizer's error is not all noise: part of it is the weight scaled, Δ ≈ α·W (2- and 3-bit types
shrink a weight's values toward zero, α ≈ −0.04 for Q2_K on the demo model), and that part changes the output far
more per unit of r than noise does: on the demo model scaling a layer's weight cost 4–200× its noise gain per
unit r (a weight a norm follows, as Qwen3's q and k, costs nothing scaled), so 2% of a Q2_K error's r made more
KLD than the other 98% (the planned GGUF measured 4× its prediction from its 2- and 3-bit feed-forward weights,
while Q4_K_M's 4-bit errors, whose α² is a thousandth of r, were predicted within 10%). So each weight is also
scaled by (1 − √R0) in a stream of its own (r = R0 exactly): its *shrink gain*, KLD per unit of α²
(quantize/sensitivity.py weighs a candidate's α² by it, the rest of its r by the noise gain).
Left out, and the reason a plan of many 2- and 3-bit weights still measures up to 2× its prediction: scalings of
different weights add in amplitude where they push the logits the same way (the demo model's last three layers'
weights scaled by 3% together: 3.5× the sum of each alone, on the held-out text), and no single factor stands for
that (every layer weight scaled at once measured 0.16× the sum on the demo model: scalings of q and k, of v and o,
of gate, up and down partly cancel); a plan's pairs would need a stream each.

Rounded inputs. llama.cpp rounds each matmul's *input* too where the weight is a quantized type (ggml's
vec_dot_type: int8 in blocks of 32 with a float16 scale, Q8_0 (Q8_1 rounds alike), for the 32-block types; int8
in blocks of 256 with a float32 scale, Q8_K, for the K-quants): a floor no weight's type removes. On the real
SmolLM2-135M, whose weights are Q4_1 values (a Q4_1 plan of it stores them almost exactly), every input rounded
to Q8_0 cost a mean KLD of 0.0033 in transformers' forward and the planned Q4_1 GGUF measured 0.0031, where its
weights' errors predicted 0.0001. Its gain is not the weight noise's: that input error's gain × r, summed,
predicted 2.1× the rounding's KLD on that model and 0.04–0.3× on the test checkpoints (the error W·Δx follows W's
own directions, weight noise spreads over all). So it is measured as the gains are, a stream per layer and
rounding (`INPUT_ROUNDINGS`): the layer runs on its clean input with every planned weight's input rounded
(a weight whose columns the block does not divide is left as it is: no type of that rounding fits it), and the
head on the clean final states with its input rounded; the stream's KLD is shared among the layer's weights by
gain × r of each weight's rounded input (r measured exactly on the window: Σ‖W(x̃ − x)‖² / Σ‖Wx‖²), giving each
weight the KLD its input's rounding costs (`MeasuredGains.inputs`). The layers' streams add up to the rounding of
every input at once (on the demo model within 25%: tests/test_gains.py); on the real model they sum to 0.0049 for
Q8_0 on its 140-token window (the head 0.0015 of it), every input rounded at once 0.0033 on 512 held-out tokens.
Expert stacks have no such stream (transformers' experts module is no linear layer whose input a hook can round).

Cost: with L layers of G weights, the streams started before layer l all run through it (a noise and a shrink
stream per weight, and one per rounding), so the forward is about L + (G + 1)·L(L+1) layer-forwards on the window
(the test checkpoints: ~150 on 256 tokens, seconds). The window shrinks so that this stays under SENSITIVITY_BUDGET
layer-tokens, never below SENSITIVITY_MIN_TOKENS: a 7B of 32 layers × 7 weights takes 123 tokens (≈ 4× the
8192-token importance forward), a 70B of 80 layers 32 tokens.
Streams hold 2·(G + 1)·L hidden states of the window (a 70B: under 1 GB).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from siliconvert.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from siliconvert.architectures import ModelSpec
    from siliconvert.streamed import WeightSource

R0 = 0.01  # the noise's relative output error: about a 4-bit quant's; a shrink scales by 1 − √R0 (r = R0 too)
SENSITIVITY_TOKENS = 256  # the window, at most
SENSITIVITY_MIN_TOKENS = 32
SENSITIVITY_BUDGET = 1 << 20  # layer-forwards × tokens
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
NOISE, SHRINK = "noise", "shrink"  # what a stream's weight took: noise, or a scaling
# roles that are never planned (routers) and so never perturbed
UNPLANNED_ROLES = ("ffn_gate_inp", "ffn_gate_inp_shexp")
Q8_0, Q8_K = "Q8_0", "Q8_K"  # llama.cpp's roundings of a matmul's input (ggml's vec_dot_type)


@dataclass(frozen=True)
class MeasuredGains:
    """HF weight name → mean KLD per unit of relative output error: of noise (`noise`) and of the weight scaled
    (`shrink`, per unit α²)."""

    noise: dict[str, float]
    shrink: dict[str, float]
    # rounding (Q8_0, Q8_K) → HF weight name → mean KLD of that weight's input so rounded (not per unit: the floor
    # of every type that rounds its input so)
    inputs: dict[str, dict[str, float]]


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded as ggml's quantize_row_q8_0 stores it, along the last axis: int8 in blocks of 32, the scale
    amax / 127 stored as float16."""
    import torch

    blocks = x.reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale.half().to(x.dtype)).reshape(x.shape)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded as ggml's quantize_row_q8_K_ref stores it, along the last axis: int8 in blocks of 256, the value
    of largest magnitude at −127, the scale a float32."""
    import torch

    blocks = x.reshape(*x.shape[:-1], -1, 256)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    inverse = torch.where(peak != 0, -127 / peak, torch.zeros_like(peak))
    scale = torch.where(inverse != 0, 1 / inverse, torch.zeros_like(inverse))
    return (torch.clamp(torch.round(blocks * inverse), max=127) * scale).reshape(x.shape)


# rounding → (block: the input width must be a multiple of it, the rounding)
INPUT_ROUNDINGS = {Q8_0: (32, round_q8_0), Q8_K: (256, round_q8_k)}


def sensitivity_tokens(layers: int, weights_per_layer: int) -> int:
    """Tokens of the window for a model of `layers` decoder layers of `weights_per_layer` perturbed weights."""
    layer_forwards = layers + (weights_per_layer + 1) * layers * (layers + 1)
    return max(SENSITIVITY_MIN_TOKENS, min(SENSITIVITY_TOKENS, SENSITIVITY_BUDGET // max(layer_forwards, 1)))


# Traits whose layers read what the window's other layers made (ModelSpec.traits' names): each perturbed stream would
# need its own per-layer inputs and its own store of shared keys and values, which this forward does not keep
UNMEASURED_TRAITS = ("per_layer_input", "kv_shared_layers")


def check_traits(spec: ModelSpec) -> None:
    """Refuse, by name, a trait the sensitivity forward cannot measure gains under (a plan needs them)."""
    traits = spec.traits()
    for trait in UNMEASURED_TRAITS:
        if trait in traits:
            raise CheckpointError(f"a plan's measured gains cannot honour the trait {trait} ({traits[trait]}): the "
                                  "sensitivity forward runs its perturbed streams through one store of layer inputs; "
                                  "use fixed quants")


def measured_gains(config: PretrainedConfig, weights: WeightSource, window: np.ndarray, roles: dict[str, str], *,
                   label: str, seed: int = 0) -> MeasuredGains:
    """Each weight's noise and shrink gains (see the module docstring), measured on
    `window` (token ids) in float32 on the CPU. `roles`: HF weight name → architecture role (routers are skipped,
    names not in it are not weights of the checkpoint)."""
    import torch

    from siliconvert.calibration import _Importance
    from siliconvert.progress import track
    from siliconvert.streamed import _free, _materialise, _record_layer_inputs, final_norm, head_logits, model_skeleton

    model = model_skeleton(config, torch.float32)
    importance = _Importance()
    importance.attach(model)
    rounding = _RoundedInputs()
    rounding.attach(model)
    body = model.model
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rng = torch.Generator().manual_seed(seed)
    errors: dict[str, float] = {}  # weight → r of its noise
    # (NOISE or SHRINK, weight) → hidden states of the stream its perturbation started
    streams: dict[tuple[str, str], torch.Tensor] = {}
    with torch.inference_mode():
        norm_name, norm = final_norm(body)
        _materialise(norm, f"model.{norm_name}.", weights, "cpu", torch.float32)
        _materialise(body.embed_tokens, "model.embed_tokens.", weights, "cpu", torch.float32)
        ids = torch.as_tensor(np.asarray(window)[None])
        importance.active = True
        clean, layer_kwargs = _record_layer_inputs(body, ids)
        importance.active = False
        with _perturbed(body.embed_tokens.weight, None, None, rng) as errors[EMBEDDING]:
            streams[NOISE, EMBEDDING] = _record_layer_inputs(body, ids)[0]
        with _scaled([body.embed_tokens.weight]):
            streams[SHRINK, EMBEDDING] = _record_layer_inputs(body, ids)[0]
        _free(body.embed_tokens)
        for index, layer in enumerate(track(body.layers, label, total=len(body.layers))):
            prefix = f"model.layers.{index}."
            _materialise(layer, prefix, weights, "cpu", torch.float32)
            args, kwargs = layer_kwargs[index]
            planned = [(prefix + param_name, _out_by_in(layer, param_name, param))
                       for param_name, param in layer.named_parameters()
                       if param.dim() >= 2 and roles.get(prefix + param_name) not in (None, *UNPLANNED_ROLES)]
            importance.active = rounding.measuring = True
            clean_out = layer(clean, *args, **kwargs)
            importance.active = rounding.measuring = False
            for key, states in streams.items():
                streams[key] = layer(states, *args, **kwargs)
            for name, param in planned:  # not a norm, a router, or a parameter the checkpoint has no weight of
                columns, routed = _importance_of(importance, name)
                with _perturbed(param, columns, routed, rng) as errors[name]:
                    streams[NOISE, name] = layer(clean, *args, **kwargs)
                with _scaled([param]):
                    streams[SHRINK, name] = layer(clean, *args, **kwargs)
            for kind in INPUT_ROUNDINGS:
                with rounding.rounded(kind, prefix, {name for name, _ in planned}) as group:
                    if group:
                        streams[kind, prefix] = layer(clean, *args, **kwargs)
            clean = clean_out
            _free(layer)
        _materialise(model.lm_head, "model.embed_tokens." if tied else "lm_head.", weights, "cpu", torch.float32)
        final = norm(clean)
        importance.active = rounding.measuring = True
        reference = _log_probs(head_logits(model, final))
        importance.active = rounding.measuring = False
        klds = {key: _mean_kld(reference, _log_probs(head_logits(model, norm(states))))
                for key, states in streams.items()}
        head_columns, _ = _importance_of(importance, HEAD)
        with _perturbed(model.lm_head.weight, head_columns, None, rng) as errors[HEAD]:
            klds[NOISE, HEAD] = _mean_kld(reference, _log_probs(head_logits(model, final)))
        with _scaled([model.lm_head.weight]):
            klds[SHRINK, HEAD] = _mean_kld(reference, _log_probs(head_logits(model, final)))
        for kind in INPUT_ROUNDINGS:
            with rounding.rounded(kind, HEAD, {HEAD}) as group:
                if group:
                    klds[kind, HEAD] = _mean_kld(reference, _log_probs(head_logits(model, final)))
        _free(model.lm_head)
        _free(norm)
    noise = {name: klds[NOISE, name] / errors[name] for name in sorted(errors) if errors[name] > 0}
    shrink = {name: klds[SHRINK, name] / R0 for name in noise}
    inputs = {kind: rounding.shared(kind, {group: kld for (key, group), kld in klds.items() if key == kind}, noise)
              for kind in INPUT_ROUNDINGS}
    return MeasuredGains(noise, shrink, inputs)


class _RoundedInputs:
    """Hooks on every linear layer: while `measuring`, each one's relative output error of its input rounded by
    every rounding (Σ‖W(x̃ − x)‖², Σ‖Wx‖²); inside `rounded`, the input of the weights named rounded."""

    def __init__(self) -> None:
        self.measuring = False
        self.active: tuple[str, set[str]] | None = None  # (rounding, weights whose input it rounds)
        self.errors: dict[tuple[str, str], float] = {}  # (rounding, weight) → Σ‖W(x̃ − x)‖²
        self.totals: dict[str, float] = {}  # weight → Σ‖Wx‖²
        self.groups: dict[tuple[str, str], set[str]] = {}  # (rounding, stream: a layer's prefix or HEAD) → weights

    def attach(self, model) -> None:
        import torch

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(self._hook(f"{name}.weight"))

    @contextmanager
    def rounded(self, kind: str, stream: str, names: set[str]) -> Iterator[set[str]]:
        """Round, while the block runs, the inputs of those of `names` that `kind` fits (measured with it: their
        width is a multiple of its block); yields them, the weights `stream` rounds."""
        group = self.groups[kind, stream] = {name for name in names if (kind, name) in self.errors}
        self.active = (kind, group)
        try:
            yield group
        finally:
            self.active = None

    def shared(self, kind: str, klds: dict[str, float], noise: dict[str, float]) -> dict[str, float]:
        """Each weight's part of its stream's KLD (`klds`: stream → KLD), in proportion to its noise gain × r
        of its rounded input."""
        shares: dict[str, float] = {}
        for stream, kld in klds.items():
            weights = sorted(name for name in self.groups[kind, stream] if name in noise)
            parts = [noise[name] * self.errors[kind, name] / self.totals[name] if self.totals[name] else 0.0
                     for name in weights]
            total = sum(parts)
            for name, part in zip(weights, parts, strict=True):
                shares[name] = max(kld, 0.0) * (part / total if total else 1 / len(weights))
        return shares

    def _hook(self, name: str):
        import torch

        def hook(module, inputs):
            x = inputs[0]
            if self.measuring:
                output = torch.nn.functional.linear(x.double(), module.weight.double())
                self.totals[name] = self.totals.get(name, 0.0) + float(output.square().sum())
                for kind, (block, round_input) in INPUT_ROUNDINGS.items():
                    if x.shape[-1] % block == 0:
                        error = torch.nn.functional.linear(round_input(x).double(), module.weight.double()) - output
                        self.errors[kind, name] = self.errors.get((kind, name), 0.0) + float(error.square().sum())
                return None
            if self.active is not None and name in self.active[1]:
                return (INPUT_ROUNDINGS[self.active[0]][1](x), *inputs[1:])
            return None
        return hook


@contextmanager
def _scaled(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """`params` scaled by 1 − √R0 (a relative output error of R0 under any importance), restored after."""
    with ExitStack() as restore:
        for param in params:
            original = param.detach().clone()
            param.mul_(1 - R0 ** 0.5)
            restore.callback(param.copy_, original)
        yield


def _out_by_in(layer: torch.nn.Module, param_name: str, param: torch.Tensor) -> torch.Tensor:
    """The parameter as [..., outputs, inputs] (a view): gpt-oss's experts hold theirs transposed (`is_transposed`)."""
    owner = layer.get_submodule(param_name.rpartition(".")[0])
    return param.transpose(-1, -2) if getattr(owner, "is_transposed", False) else param


@contextmanager
def _perturbed(param: torch.Tensor, columns: torch.Tensor | None, routed: torch.Tensor | None,
               rng: torch.Generator) -> Iterator[float]:
    """`param` with noise of relative output error ≈ R0 added while the block runs (restored after), yielding the
    noise's r under the importance `columns` (per input column, or [experts, columns]; None: every column alike)
    and, for an expert stack, its experts weighted by the `routed` tokens."""
    import torch

    original = param.detach().clone()
    rows_rms = original.square().mean(-1, keepdim=True).sqrt()
    noise = R0 ** 0.5 * rows_rms * torch.randn(original.shape, generator=rng)
    param.add_(noise)
    try:
        yield _relative_error(original, noise, columns, routed)
    finally:
        param.copy_(original)


def _relative_error(weight: torch.Tensor, delta: torch.Tensor, columns: torch.Tensor | None,
                    routed: torch.Tensor | None) -> float:
    """Σ a_j Δ²_ij / Σ a_j W²_ij per matrix (quantize/sensitivity.py `relative_error`); a stack's matrices
    weighted by their share of `routed` tokens (all alike where none)."""
    weight, delta = weight.double().reshape(-1, *weight.shape[-2:]), delta.double().reshape(-1, *delta.shape[-2:])
    column_delta, column_total = delta.square().sum(-2), weight.square().sum(-2)  # [matrices, columns]
    if columns is not None:
        column_delta, column_total = column_delta * columns.double(), column_total * columns.double()
    per_matrix = column_delta.sum(-1) / column_total.sum(-1).clamp(min=1e-300)
    if routed is None or not float(routed.sum()):
        return float(per_matrix.mean())
    return float((per_matrix * routed.double()).sum() / routed.double().sum())


def _importance_of(importance, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mean x² per input column, or a row per expert; tokens routed per expert) of a weight on the window."""
    if name in importance.sums:
        return importance.sums[name] / importance.rows[name], None
    if name in importance.expert_sums:
        rows = importance.expert_rows[name]
        return importance.expert_sums[name] / rows.clamp(min=1)[:, None], rows
    return None, None


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.log_softmax(logits[0].double(), -1)


def _mean_kld(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.exp() * (reference - other)).sum(-1).mean())
