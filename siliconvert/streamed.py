"""A transformers forward pass run one decoder layer at a time over every window, weights read as needed.

A 7B model in float32 is 29 GB; one of its decoder layers is under 1 GB. So the model is built without
weights (on PyTorch's meta device, from its config, never with remote code) and transformers' own
modules do all the maths: every window goes through the embedding; then each decoder layer in turn
has its weights read, takes every window's hidden states, and is freed; then the final norm and the
head. The keyword arguments each layer receives (causal or sliding-window mask, rotary cos/sin,
positions) are recorded from transformers' own model forward, so no family's glue is restated here.

Where the weights come from is pluggable (`WeightSource`): the source checkpoint for the reference,
an MLX folder's dequantized weights for the MLX stand-in (validate/runners/mlx.py). Several forwards can share one
pass (`streamed_forward`, a `Stream` each: the calibration's and the reference's in a run that does both): each
module's weights are read once, and each stream runs them in its own model, device and dtype.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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


class SharedForward(Protocol):
    """A forward that joins a streamed pass run for another's sake (the reference logits, in the calibration's pass:
    validate/reference.py), so that each layer's weights are read once for both. It runs where the pass runs (a
    child process), so it must pickle."""

    def stream(self) -> Stream:
        """Its stream in the pass (called in the pass's process, before the pass)."""
        ...

    def finish(self, logits: np.ndarray | None) -> None:
        """Its stream's logits, after the pass (None where they were not kept or its stream overflowed)."""
        ...


class Float16Overflow(ArithmeticError):
    """The residual stream left float16's range (Gemma's does in real checkpoints): run in another dtype."""

    def __init__(self, layer: int):
        super().__init__(f"float16 overflowed in decoder layer {layer}")
        self.layer = layer


@dataclass
class Stream:
    """One model's forward in a streamed pass: its windows, on its device and in its dtype, with its hooks.

    Several streams share a pass (`streamed_forward`): each module's weights are read once and every stream's
    windows go through it, each stream in a skeleton of its own, so each result is what a pass of its own gives,
    bit for bit. `prepare` gets the stream's model before it runs (to add hooks, say); with `keep_logits` false the
    head still runs, for such hooks, and no logits are kept. Windows may differ in length where no logits are kept
    (a calibration runs a short window beside long ones); `window_started` is called with a window's index before
    the model's modules run on it (its embedding, each layer, the head), so hooks can tell the windows apart, and
    with None when the stream hands the module over to the next stream (hooks that act on shared state, such as a
    modeling module's function, stand aside then).
    """

    windows: Sequence[np.ndarray]
    device: str
    dtype: torch.dtype
    prepare: Callable[[PreTrainedModel], None] | None = None
    keep_logits: bool = True
    window_started: Callable[[int | None], None] | None = None
    # the decoder layer where a float16 stream left float16's range (the pass went on without it); None if it did not
    overflowed: int | None = field(default=None, init=False)


def streamed_logits(config: PretrainedConfig, weights: WeightSource, windows: np.ndarray | Sequence[np.ndarray], *,
                    device: str, dtype: torch.dtype, label: str,
                    prepare: Callable[[PreTrainedModel], None] | None = None,
                    keep_logits: bool = True,
                    window_started: Callable[[int | None], None] | None = None) -> np.ndarray | None:
    """Logits [windows, length, vocab] (float32) of transformers' model for `config` on each window: a pass of one
    `Stream` (see it for the arguments). Raises Float16Overflow where a float16 stream leaves float16's range."""
    stream = Stream(windows, device, dtype, prepare, keep_logits, window_started)
    logits = streamed_forward(config, weights, [stream], label=label)[0]
    if stream.overflowed is not None:
        raise Float16Overflow(stream.overflowed)
    return logits


def streamed_forward(config: PretrainedConfig, weights: WeightSource, streams: Sequence[Stream], *,
                     label: str) -> list[np.ndarray | None]:
    """Each stream's logits [windows, length, vocab] (float32; None where not kept, or where the stream overflowed)
    of transformers' model for `config`, in one pass over the weights: each module's weights are read once.

    Each window is run on its own (batch of one), as a whole-model reference runs it, so the results
    are that reference's up to float rounding. Peak memory: one decoder layer's weights (a copy per stream whose
    device or dtype differs from the source's float32 on the CPU), the embedding or the head, every window's hidden
    states, and the logits. A float16 stream whose hidden states leave float16's range is dropped where that happens
    (`Stream.overflowed`); the others go on.
    """
    runs = [_StreamRun(config, stream) for stream in streams]
    with torch.inference_mode():
        read: dict[str, dict[str, torch.Tensor]] = {}  # prefix → a module's state, read once for every stream
        for run in runs:
            run.embed(weights, read)
        read.clear()  # the embedding's tables, freed before the first layer is read
        layers = len(runs[0].body.layers) if runs else 0
        for index in track(range(layers), label, total=layers):
            live = [run for run in runs if run.stream.overflowed is None]
            if not live:  # no stream is left to use the remaining layers
                break
            state = _read_state(live[0].body.layers[index], f"model.layers.{index}.", weights)
            for run in live:
                run.layer(index, state)
            del state
            for run in live:
                run.check_range(index)
        results = [run.head(weights, read) if run.stream.overflowed is None else None for run in runs]
    return results


class _StreamRun:
    """One stream's model and hidden states through a streamed pass."""

    def __init__(self, config: PretrainedConfig, stream: Stream) -> None:
        self.stream = stream
        self.windows = [np.asarray(window) for window in stream.windows]
        lengths = {len(window) for window in self.windows}
        if stream.keep_logits and len(lengths) > 1:
            raise ValueError(f"logits are kept for windows of one length, not of {sorted(lengths)}")
        self.started = stream.window_started or (lambda _index: None)
        self.model = model_skeleton(config, stream.dtype)
        if stream.prepare is not None:
            stream.prepare(self.model)
        self.body = self.model.model
        if getattr(self.body, "rotary_emb", None) is not None:  # a model without positions (Granite 4.0-H) has none
            self.body.rotary_emb.to(stream.device)
        self.tied_head = self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight
        self.hidden: list[torch.Tensor] = []
        self.layer_args: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []  # window → each layer's arguments

    def _load(self, module: torch.nn.Module, prefix: str, weights: WeightSource,
              read: dict[str, dict[str, torch.Tensor]]) -> None:
        """Give `module` its weights, read unless another stream read them into `read`."""
        if prefix not in read:
            read[prefix] = _read_state(module, prefix, weights)
        _assign(module, read[prefix], self.stream.device, self.stream.dtype)

    def embed(self, weights: WeightSource, read: dict[str, dict[str, torch.Tensor]]) -> None:
        """The final norm's weights, and every window through what the body runs before its first layer."""
        device = self.stream.device
        self.norm_name, self.norm = final_norm(self.body)
        self._load(self.norm, f"model.{self.norm_name}.", weights, read)
        # what the body runs before its first layer: the embedding, and Gemma 4's per-layer input tables
        inputs = [(name, module) for name, module in self.body.named_children()
                  if name not in ("layers", self.norm_name) and next(module.parameters(), None) is not None]
        for name, module in inputs:
            self._load(module, f"model.{name}.", weights, read)
        by_length: dict[int, list[dict[str, Any]]] = {}
        for window_index, window in enumerate(self.windows):
            self.started(window_index)
            embedded, calls = _record_layer_inputs(self.body, torch.as_tensor(window[None], device=device))
            self.hidden.append(embedded)
            # No padding: every window of a length gets the same masks and rotary tables, kept once. What is the
            # window's own (Gemma 4's per-layer inputs, positional; the keys and values its kv-shared layers read
            # from earlier layers, a store each forward makes anew) is kept per window.
            shared = by_length.setdefault(len(window), [kwargs for _, kwargs in calls])
            self.layer_args.append([(args, {key: value if key in WINDOW_OWN_KWARGS else shared[index][key]
                                            for key, value in kwargs.items()})
                                    for index, (args, kwargs) in enumerate(calls)])
        self.started(None)
        for _, module in inputs:
            _free(module)

    def layer(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Every window through decoder layer `index`, whose weights are `state`."""
        layer = self.body.layers[index]
        _assign(layer, state, self.stream.device, self.stream.dtype)
        for window_index, states in enumerate(self.hidden):
            self.started(window_index)
            args, kwargs = self.layer_args[window_index][index]
            self.hidden[window_index] = layer(states, *args, **kwargs)
        self.started(None)
        _free(layer)

    def check_range(self, index: int) -> None:
        """Drop a float16 stream whose hidden states left float16's range in decoder layer `index`."""
        if self.stream.dtype == torch.float16 and not all(torch.isfinite(states).all() for states in self.hidden):
            self.stream.overflowed = index
            self.hidden.clear()
            _free(self.norm)

    def head(self, weights: WeightSource, read: dict[str, dict[str, torch.Tensor]]) -> np.ndarray | None:
        """The final norm and the head on every window: the logits, where kept."""
        self._load(self.model.lm_head, "model.embed_tokens." if self.tied_head else "lm_head.", weights, read)
        length = len(self.windows[0]) if self.windows else 0
        logits = (np.empty((len(self.windows), length, self.model.lm_head.out_features), dtype=np.float32)
                  if self.stream.keep_logits else None)
        for row, states in enumerate(self.hidden):
            self.started(row)
            window_logits = head_logits(self.model, self.norm(states))
            if logits is not None:
                logits[row] = window_logits[0].float().cpu().numpy()
        self.started(None)
        _free(self.model.lm_head)
        _free(self.norm)
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
    _assign(module, _read_state(module, prefix, weights), device, dtype)


def _read_state(module: torch.nn.Module, prefix: str, weights: WeightSource) -> dict[str, torch.Tensor]:
    """The module's weights as the source holds them (float32 on the CPU), by their names in the module."""
    # buffers the checkpoint holds (Gemma 4's layer_scalar) are read as weights are; the others are the model's
    # own (rotary tables, embedding scales), left as built
    names = [name for name, _ in module.named_parameters()] + _stored_buffers(module)
    return {name: weights.tensor(prefix + name) for name in names}


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> None:
    """Give the module `state`'s weights on `device` in `dtype` (the source's own tensors where those are theirs:
    streams on the CPU in float32 share them)."""
    module.load_state_dict({name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()},
                           strict=True, assign=True)


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
