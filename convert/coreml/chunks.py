"""Which layers each package holds, how many bytes they weigh, and the blobs a package's weight.bin holds for
each tensor (weight ids the graph names its consts by)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from siliconvert.architectures import ModelSpec, TensorRole
from siliconvert.architectures.base import Mixer
from siliconvert.errors import CheckpointError, RecipeError

AUTO_CHUNK_BYTES = 1 << 30  # `chunks: auto`: ≤ ~1 GiB of fp16 weights per package, as ANE projects use
HEAD_SPLIT = 16384  # the ANE caps a convolution's output channels; a 32k–150k vocabulary head is split
# (role, layer or None, "weight"/"bias"): what the graph builder asks for
Key = tuple[str, int | None, str]
# The mixers a package can run, each with the states it keeps per sequence (graph.py makes them)
MIXER_STATES: dict[Mixer, tuple[str, ...]] = {"attention": ("key_cache", "value_cache"), "short_conv": ("conv_state",),
                                              "gated_delta": ("delta_conv_state", "recurrent_state"),
                                              "mamba2": ("ssm_conv_state", "ssm_state")}
VALID_TOKENS = "valid_tokens"  # the input of a chunk with recurrent states: how many of the call's tokens are real
# Gemma 4's per-layer inputs (1, layers, size, S): made by the first chunk from the token ids and its embeddings, an
# output of it and an input of every later chunk
PER_LAYER_INPUTS = "per_layer_inputs"


def role_key(role: TensorRole) -> Key:
    """The key of a checkpoint tensor of this role."""
    return role.role, role.layer, role.kind


@dataclass(frozen=True)
class Chunk:
    index: int
    layers: range
    first: bool  # embeds token ids
    last: bool  # ends with the final norm and the LM head
    # the chunk's layers of each mixer it has (`layers_by_mixer`), in layer order: a state's row is its index here
    mixers: tuple[tuple[Mixer, tuple[int, ...]], ...]
    per_layer_inputs: bool = False  # the model has per-layer inputs (PER_LAYER_INPUTS)

    def mixer_layers(self, mixer: Mixer) -> tuple[int, ...]:
        return dict(self.mixers).get(mixer, ())

    @property
    def recurrent(self) -> bool:
        """Whether a state of the chunk advances with every token (unlike a KV cache, which is written by position):
        padding in a prefill block must not advance it, so the chunk takes VALID_TOKENS."""
        return any(layers for mixer, layers in self.mixers if mixer != "attention")

    @property
    def package(self) -> str:
        return f"chunk_{self.index + 1:02d}.mlpackage"

    def input_names(self) -> list[str]:
        return ["input_ids" if self.first else "hidden_states", "position", *([VALID_TOKENS] if self.recurrent else []),
                *([PER_LAYER_INPUTS] if self.per_layer_inputs and not self.first else [])]

    def state_names(self) -> list[str]:
        return [state for mixer, layers in self.mixers if layers for state in MIXER_STATES[mixer]]

    def output_name(self) -> str:
        return "logits" if self.last else "hidden_states_out"

    def output_names(self) -> list[str]:
        """The output passed on to the next chunk (or the logits), and the per-layer inputs the first chunk makes
        for the later ones."""
        return [self.output_name(), *([PER_LAYER_INPUTS] if self.per_layer_inputs and self.first and not self.last
                                      else [])]


def plan_chunks(spec: ModelSpec, chunks: int | str) -> list[Chunk]:
    """Split the layers into consecutive chunks: `chunks` of them, or by AUTO_CHUNK_BYTES for "auto". A kv-shared
    layer stays in the chunk of the layer whose cache it reads (kept_with_sources): "auto" makes fewer chunks where
    it must; a count that cannot be kept is refused by name."""
    if chunks == "auto":
        count = min(spec.num_layers, max(1, math.ceil(model_bytes(spec) / AUTO_CHUNK_BYTES)))
    elif chunks > spec.num_layers:
        raise RecipeError(f"coreml chunks: {chunks} is more than the model's {spec.num_layers} layers")
    else:
        count = int(chunks)
    bounds = kept_with_sources(spec, [int(b) for b in np.linspace(0, spec.num_layers, count + 1).round()])
    if len(bounds) - 1 < count and chunks != "auto":
        raise CheckpointError(f"Core ML cannot honour the trait kv_shared_layers across chunks: {count} chunks would "
                              "part a kv-shared layer from the layer whose KV cache it reads; at most "
                              f"{len(bounds) - 1} keep them together")
    count = len(bounds) - 1
    return [
        Chunk(i, range(bounds[i], bounds[i + 1]), first=i == 0, last=i == count - 1,
              mixers=layers_by_mixer(spec, range(bounds[i], bounds[i + 1])), per_layer_inputs=spec.per_layer_input > 0)
        for i in range(count)
    ]


def kept_with_sources(spec: ModelSpec, bounds: list[int]) -> list[int]:
    """The chunk bounds moved down until no kv-shared layer is past one with its source before it (a layer reads
    its source's cache row within its chunk: cache_slots); bounds that meet another are dropped."""
    moved = [0]
    for bound in bounds[1:-1]:
        while parted := [source for layer, spec_layer in enumerate(spec.layers[bound:], bound)
                         if (source := spec_layer.kv_source) is not None and source < bound]:
            bound = min(parted)
        if bound > moved[-1]:
            moved.append(bound)
    return [*moved, bounds[-1]]


def cache_slots(spec: ModelSpec, chunk: Chunk) -> dict[int, tuple[str, int]]:
    """Each attention layer of the chunk → (the suffix of its KV cache states' names, its row in them). The layers
    of one head size and k/v head count share a pair of states: `key_cache` and `value_cache` for the model's
    own sizes, `key_cache_{kv heads}x{head dim}` and its value state for the others (Gemma 4's global layers); a
    kv-shared layer has no row of its own and reads its source layer's (plan_chunks keeps them together)."""
    slots: dict[int, tuple[str, int]] = {}
    rows: dict[str, int] = {}  # suffix → rows so far
    for layer in chunk.mixer_layers("attention"):
        if (source := spec.layers[layer].kv_source) is not None:
            slots[layer] = slots[source]
            continue
        sizes = (spec.layer_kv_heads(layer), spec.layer_head_dim(layer))
        suffix = "" if sizes == (spec.num_kv_heads, spec.head_dim) else f"_{sizes[0]}x{sizes[1]}"
        slots[layer] = (suffix, rows.get(suffix, 0))
        rows[suffix] = slots[layer][1] + 1
    return slots


def layers_by_mixer(spec: ModelSpec, layers: range) -> tuple[tuple[Mixer, tuple[int, ...]], ...]:
    """The one place the Core ML writer reads the mixer trait: `layers` grouped by mixer, a mixer no package can
    run (none in MIXER_STATES) refused by name."""
    grouped: dict[Mixer, list[int]] = {}
    for layer in layers:
        mixer = spec.layers[layer].mixer
        if mixer not in MIXER_STATES:
            raise CheckpointError(f"Core ML cannot honour the trait mixer={mixer!r} (layer {layer}): its packages run "
                                  f"the mixers {', '.join(MIXER_STATES)}")
        grouped.setdefault(mixer, []).append(layer)
    return tuple((mixer, tuple(grouped[mixer])) for mixer in MIXER_STATES if mixer in grouped)


def layer_bytes(spec: ModelSpec, layer: int) -> int:
    """fp16 bytes of a layer's weights (norms aside), at its own sizes (Gemma 4's)."""
    h, d = spec.hidden_size, spec.layer_head_dim(layer)
    q = spec.num_heads * d
    # a kv-shared layer has no k/v projections, a k_eq_v layer no v_proj
    kv = 0 if spec.layers[layer].kv_source is not None else spec.layer_kv_heads(layer) * d
    values = 0 if spec.layers[layer].values_from_keys else kv
    if spec.layers[layer].sparse:  # the router, the experts, and a shared expert with its gate where there is one
        experts = spec.experts
        mlp = experts.count * (h + 3 * h * experts.intermediate_size)
        if experts.shared_intermediate_size:
            mlp += h + 3 * h * experts.shared_intermediate_size
        if experts.beside_dense:
            mlp += 3 * h * spec.intermediate_size
    else:
        mlp = 3 * h * spec.layer_intermediate_size(layer)
    mlp += 2 * h * spec.per_layer_input  # its per-layer input's gate and projection
    if spec.layers[layer].mixer == "short_conv":  # in_proj (B, C, x), out_proj and the kernel
        return 2 * (4 * h * h + h * spec.short_conv.kernel + mlp)
    if spec.layers[layer].mixer == "gated_delta":  # in_proj's q, k, v, z, b, a rows, out_proj and the kernel
        delta = spec.gated_delta
        rows = delta.conv_channels + 2 * delta.value_size + 2 * delta.value_heads
        return 2 * (h * rows + delta.conv_channels * delta.conv_kernel + mlp)
    if spec.layers[layer].mixer == "mamba2":  # in_proj's z, xBC and dt rows, out_proj and the kernel
        mamba = spec.mamba2
        rows = mamba.inner_size + mamba.conv_channels + mamba.heads
        return 2 * (h * (rows + mamba.inner_size) + mamba.conv_channels * mamba.conv_kernel + mlp)
    queries = 2 * q if spec.attn_output_gate else q  # q_proj's query rows, and its gate rows where there are
    return 2 * (h * (queries + q + kv + values) + mlp)


def model_bytes(spec: ModelSpec) -> int:
    tables = 1 if spec.tie_word_embeddings else 2
    layers = sum(layer_bytes(spec, layer) for layer in range(spec.num_layers))
    # Gemma 4's per-layer input table and projection, in the first chunk
    per_layer = 2 * spec.num_layers * spec.per_layer_input * (spec.per_layer_input_vocab + spec.hidden_size)
    return layers + tables * 2 * spec.vocab_size * spec.hidden_size + per_layer


def head_role(spec: ModelSpec) -> str:
    return "token_embd" if spec.tie_word_embeddings else "output"


def head_pieces(spec: ModelSpec) -> list[range]:
    """Rows of the LM head that each of its convolutions computes (one piece when the vocabulary fits)."""
    return [range(i, min(i + HEAD_SPLIT, spec.vocab_size)) for i in range(0, spec.vocab_size, HEAD_SPLIT)]


def weight_id(key: Key, piece: int | None = None) -> str:
    """The name of one blob in a package's weight.bin: a whole tensor, or one piece of a split LM head."""
    role, layer, kind = key
    name = f"{role}.{kind}" if layer is None else f"{role}.{layer}.{kind}"
    return name if piece is None else f"{name}#{piece}"


def blobs_of(spec: ModelSpec, chunk: Chunk, key: Key) -> list[tuple[str, slice]]:
    """(weight id, rows) of the blobs a chunk's weight.bin holds for one tensor: the whole tensor, or for a split
    LM head one blob per piece, since a const can only point at a whole blob. A tied table that both embeds and
    projects in one chunk is stored once: the embedding gathers from the head's blobs, whole or in pieces
    (graph.embed), where a second copy for the gather alone would cost the package a fifth of its bytes on a
    small model with a large vocabulary (SmolLM2-135M's table is 28 M of its 134 M weights)."""
    pieces = head_pieces(spec)
    if not (chunk.last and key[0] == head_role(spec)) or len(pieces) == 1:
        return [(weight_id(key), slice(None))]
    return [(weight_id(key, i), slice(rows.start, rows.stop)) for i, rows in enumerate(pieces)]
