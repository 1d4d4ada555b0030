"""A transformers forward pass run one decoder layer at a time over every window, weights read as needed.

A 7B model in float32 is 29 GB; one of its decoder layers is under 1 GB. So the model is built without
weights (on PyTorch's meta device, from its config, never with remote code) and transformers' own
modules do all the maths: every window goes through the embedding; then each decoder layer in turn
has its weights read, takes every window's hidden states, and is freed; then the final norm and the
head. The keyword arguments each layer receives (causal or sliding-window mask, rotary cos/sin,
positions) are recorded from transformers' own model forward, so no family's glue is restated here.

Where the weights come from is pluggable (`WeightSource`): the source checkpoint for the reference,
an MLX folder's dequantized weights for the MLX stand-in (validate/runners/mlx.py).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from siliconvert.checkpoint import Checkpoint, read_model_tensor
from siliconvert.progress import track

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


class WeightSource(Protocol):
    def tensor(self, name: str) -> torch.Tensor:
        """One parameter by its transformers name and in its layout, float32 on the CPU."""
        ...


class CheckpointWeights:
    """Parameters read one at a time from the source checkpoint, in transformers' layout (bfloat16 widens exactly to
    float32; MXFP4 dequantizes as transformers does)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.infos = checkpoint.tensor_infos

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(read_model_tensor(self.infos[name]))


class Float16Overflow(ArithmeticError):
    """The residual stream left float16's range (Gemma's does in real checkpoints): run in another dtype."""

    def __init__(self, layer: int):
        super().__init__(f"float16 overflowed in decoder layer {layer}")
        self.layer = layer


def streamed_logits(config: PretrainedConfig, weights: WeightSource, windows: np.ndarray | Sequence[np.ndarray], *,
                    device: str, dtype: torch.dtype, label: str,
                    prepare: Callable[[PreTrainedModel], None] | None = None,
                    keep_logits: bool = True,
                    window_started: Callable[[int], None] | None = None) -> np.ndarray | None:
    """Logits [windows, length, vocab] (float32) of transformers' model for `config` on each window.

    Each window is run on its own (batch of one), as a whole-model reference runs it, so the results
    are that reference's up to float rounding. Peak memory: one decoder layer's weights, the
    embedding or the head, every window's hidden states, and the logits. `prepare` gets the model
    before it runs (to add hooks, say); with `keep_logits` false the head still runs, for such hooks,
    and nothing is returned. Windows may differ in length where no logits are kept (a calibration runs a
    short window beside long ones while each layer's weights are loaded); `window_started` is called
    with a window's index before the model's modules run on it (its embedding, each layer, the head),
    so hooks can tell the windows apart.
    """
    windows = [np.asarray(window) for window in windows]
    lengths = [len(window) for window in windows]
    if keep_logits and len(set(lengths)) > 1:
        raise ValueError(f"logits are kept for windows of one length, not of {sorted(set(lengths))}")
    started = window_started or (lambda _index: None)
    model = model_skeleton(config, dtype)
    if prepare is not None:
        prepare(model)
    body = model.model
    if getattr(body, "rotary_emb", None) is not None:  # a model without positions (Granite 4.0-H) has none
        body.rotary_emb.to(device)
    tied_head = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.inference_mode():
        norm_name, norm = final_norm(body)
        _materialise(norm, f"model.{norm_name}.", weights, device, dtype)
        # what the body runs before its first layer: the embedding, and Gemma 4's per-layer input tables
        inputs = [(name, module) for name, module in body.named_children()
                  if name not in ("layers", norm_name) and next(module.parameters(), None) is not None]
        for name, module in inputs:
            _materialise(module, f"model.{name}.", weights, device, dtype)
        hidden: list[torch.Tensor] = []
        layer_args: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []  # window → each layer's arguments
        by_length: dict[int, list[dict[str, Any]]] = {}
        for window_index, window in enumerate(windows):
            started(window_index)
            embedded, calls = _record_layer_inputs(body, torch.as_tensor(window[None], device=device))
            hidden.append(embedded)
            # No padding: every window of a length gets the same masks and rotary tables, kept once. What is the
            # window's own (Gemma 4's per-layer inputs, positional; the keys and values its kv-shared layers read
            # from earlier layers, a store each forward makes anew) is kept per window.
            shared = by_length.setdefault(len(window), [kwargs for _, kwargs in calls])
            layer_args.append([(args, {key: value if key in WINDOW_OWN_KWARGS else shared[index][key]
                                       for key, value in kwargs.items()})
                               for index, (args, kwargs) in enumerate(calls)])
        for _, module in inputs:
            _free(module)
        for index, layer in enumerate(track(body.layers, label, total=len(body.layers))):
            _materialise(layer, f"model.layers.{index}.", weights, device, dtype)
            for window_index, states in enumerate(hidden):
                started(window_index)
                args, kwargs = layer_args[window_index][index]
                hidden[window_index] = layer(states, *args, **kwargs)
            _free(layer)
            if dtype == torch.float16 and not all(torch.isfinite(states).all() for states in hidden):
                raise Float16Overflow(index)
        head_prefix = "model.embed_tokens." if tied_head else "lm_head."
        _materialise(model.lm_head, head_prefix, weights, device, dtype)
        logits = (np.empty((len(windows), lengths[0] if windows else 0, model.lm_head.out_features),
                           dtype=np.float32) if keep_logits else None)
        for row, states in enumerate(hidden):
            started(row)
            window_logits = head_logits(model, norm(states))
            if logits is not None:
                logits[row] = window_logits[0].float().cpu().numpy()
        _free(model.lm_head)
        _free(norm)
    return logits


# A layer's keyword arguments that are its window's own, not its length's: Gemma 4's store of keys and values that
# its kv-shared layers read from the layers that made them
WINDOW_OWN_KWARGS = ("shared_kv_states",)
# What transformers' model bodies call the norm after the last layer (LFM2's is `embedding_norm`)
FINAL_NORM_NAMES = ("norm", "embedding_norm")


def final_norm(body: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The body's final norm module and its attribute name."""
    for name in FINAL_NORM_NAMES:
        if isinstance(module := getattr(body, name, None), torch.nn.Module):
            return name, module
    raise NotImplementedError(f"{type(body).__name__} has none of the final norms {FINAL_NORM_NAMES}")


# Optional kernel packages transformers runs a mixer with, when installed and on CUDA (module name → package);
# otherwise it takes its own PyTorch path, which is then what the reference computed
MIXER_KERNELS: dict[str, dict[str, str]] = {
    "short_conv": {"causal_conv1d": "causal-conv1d"},
    "gated_delta": {"causal_conv1d": "causal-conv1d", "fla": "flash-linear-attention"},
}
_TORCH_PATH_NOTE = re.compile(r"^`\w+` is falling back to its reference PyTorch implementation")


def torch_path_kernels(mixers: Iterable[str], device: str) -> list[str]:
    """The optional kernel packages of `mixers` that a run on `device` goes without (transformers' PyTorch path)."""
    packages = {module: package for mixer in mixers for module, package in MIXER_KERNELS.get(mixer, {}).items()}
    return sorted(package for module, package in packages.items()
                  if device != "cuda" or importlib.util.find_spec(module) is None)


class _TorchPathNote(logging.Filter):
    """Drops transformers' note that a kernel falls back to PyTorch: advice for model authors that would reach the
    user's terminal; the report says which path the reference took (`torch_path_kernels`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _TORCH_PATH_NOTE.match(record.getMessage())


def model_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """transformers' model for `config` with every parameter on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    kernels_logger = logging.getLogger("transformers.integrations.hub_kernels")
    if not any(isinstance(f, _TorchPathNote) for f in kernels_logger.filters):
        kernels_logger.addFilter(_TorchPathNote())

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    # Buffers computed at construction (rotary inverse frequencies, Gemma's embedding scale) landed on meta
    # too. As transformers' from_pretrained does, give them real storage and let the model's own
    # _init_weights fill them in (on the meta parameters beside them, its initialisers do nothing).
    owners = {}
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner_name, _, buffer_name = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[buffer_name] = torch.empty_like(buffer, device="cpu")
            owners[owner_name] = owner
    for owner in owners.values():
        model._init_weights(owner)
    left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if left:
        raise NotImplementedError(f"{type(model).__name__}: buffers {left} would need rebuilding off meta")
    return model.eval().requires_grad_(False)


def head_logits(model: PreTrainedModel, final_states: torch.Tensor) -> torch.Tensor:
    """The logits transformers' own forward makes of the body's output (`final_states`, after the final
    norm): the head, and whatever the family does after it (Gemma 2's soft-cap, Granite's logits scaling).
    The body stands aside and hands the states over."""
    from transformers.modeling_outputs import MoeModelOutputWithPast

    class BodyOutput(MoeModelOutputWithPast):
        """The body's output: the final states, and None for any other field a family's head reads (the mixtures
        of experts' router_logits, Gemma 4's shared_kv_states)."""

        def __getattr__(self, name: str) -> None:
            if name.startswith("__"):
                raise AttributeError(name)
            return None

    body = model.model
    body.forward = lambda *args, **kwargs: BodyOutput(last_hidden_state=final_states)
    try:
        placeholder_ids = torch.zeros(final_states.shape[:2], dtype=torch.long, device=final_states.device)
        return model(input_ids=placeholder_ids, use_cache=False).logits
    finally:
        del body.forward


def _record_layer_inputs(body: torch.nn.Module, input_ids: torch.Tensor
                         ) -> tuple[torch.Tensor, list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Run transformers' model forward with every decoder layer standing aside (passing its input
    through); return the first layer's input and the arguments each layer was called with beside it."""
    first_input: list[torch.Tensor] = []
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def recorder(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        first_input[:] = first_input or [hidden_states]
        calls.append((args, kwargs))
        return hidden_states

    for layer in body.layers:
        layer.forward = recorder
    try:
        body(input_ids=input_ids, use_cache=False)
    finally:
        for layer in body.layers:
            del layer.forward
    return first_input[0], calls


def _materialise(module: torch.nn.Module, prefix: str, weights: WeightSource, device: str,
                 dtype: torch.dtype) -> None:
    state = {name: weights.tensor(prefix + name).to(device=device, dtype=dtype)
             for name, _ in module.named_parameters()}
    # buffers the checkpoint holds (Gemma 4's layer_scalar) are read as weights are; the others are the model's
    # own (rotary tables, embedding scales), left as built
    for name in _stored_buffers(module):
        state[name] = weights.tensor(prefix + name).to(device=device, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)


def _stored_buffers(module: torch.nn.Module) -> list[str]:
    """The module's persistent buffers (saved in a checkpoint beside the parameters)."""
    names = []
    for owner_name, owner in module.named_modules():
        for name in owner._buffers:
            if name not in owner._non_persistent_buffers_set and owner._buffers[name] is not None:
                names.append(f"{owner_name}.{name}" if owner_name else name)
    return names


def _free(module: torch.nn.Module) -> None:
    module.to("meta")
