"""Core ML: ML Programs built with coremltools' MIL builder straight from the streamed weights.

One layout for every model size, so apps and runners never branch on it:

    <out_dir>/<model_name>-fp16-coreml/
        manifest.json            which package holds which layers; inputs, outputs, states, context length
        chunk_01.mlpackage ...   consecutive layers each (the first also embeds tokens, the last holds the
                                 final norm and the LM head); every package has two functions sharing one
                                 copy of the weights: "decode" (1 token) and "prefill" (a block of tokens)
        tokenizer files          copied from the source, what a Swift app bundles

Every function takes `position` (int32 [1], where its first token goes in the sequence) and carries the KV
cache of its layers in two states, `key_cache` and `value_cache` (fp16 [layers, kv_heads, context,
head_dim]); the causal mask and the RoPE angles are computed inside from `position`.

Chunks bound memory on the device and during conversion: a chunk is built and saved as soon as its last
tensor arrives, and its tensors are dropped. Streamed tensors wait in a buffer of one chunk's size;
tensors that arrive early (safetensors stores names alphabetically: layer 10 before layer 2) spill to disk
past it, so the bound holds whatever the stream order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types

from siliconvert.architectures import ModelSpec
from siliconvert.artifacts import Artifact, Writer
from siliconvert.errors import CheckpointError, OutputError, RecipeError
from siliconvert.quantize.coreml import compress_function_package
from siliconvert.recipe import CoreMLTarget

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PREFILL_BLOCK = 64  # tokens per prefill call: ANE kernels like a fixed, moderately wide sequence axis
AUTO_CHUNK_BYTES = 1 << 30  # `chunks: auto`: ≤ ~1 GiB of fp16 weights per package, as ANE projects use
HEAD_SPLIT = 16384  # the ANE caps a convolution's output channels; a 32k–150k vocabulary head is split
MASK_VALUE = -30000.0  # additive mask: exp() of it is 0, yet adding it to any score stays finite in fp16
NORM_FLOOR = 2.0**-6  # RMSNorm divides by max(|x|, floor): an all-zero token must not divide by zero
# (role, layer or None, "weight"/"bias"): what the graph builder asks for
Key = tuple[str, int | None, str]


@dataclass(frozen=True)
class Chunk:
    index: int
    layers: range
    first: bool  # embeds token ids
    last: bool  # ends with the final norm and the LM head

    @property
    def package(self) -> str:
        return f"chunk_{self.index + 1:02d}.mlpackage"

    def input_names(self) -> list[str]:
        return ["input_ids" if self.first else "hidden_states", "position"]

    def output_name(self) -> str:
        return "logits" if self.last else "hidden_states_out"


def plan_chunks(spec: ModelSpec, chunks: int | str) -> list[Chunk]:
    """Split the layers into consecutive chunks: `chunks` of them, or by AUTO_CHUNK_BYTES for "auto"."""
    if chunks == "auto":
        count = min(spec.num_layers, max(1, math.ceil(model_bytes(spec) / AUTO_CHUNK_BYTES)))
    elif chunks > spec.num_layers:
        raise RecipeError(f"coreml chunks: {chunks} is more than the model's {spec.num_layers} layers")
    else:
        count = int(chunks)
    bounds = np.linspace(0, spec.num_layers, count + 1).round().astype(int)
    return [
        Chunk(i, range(bounds[i], bounds[i + 1]), first=i == 0, last=i == count - 1) for i in range(count)
    ]


def layer_bytes(spec: ModelSpec) -> int:
    h, q, kv, ff = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    return 2 * (h * (2 * q + 2 * kv) + 3 * h * ff)


def model_bytes(spec: ModelSpec) -> int:
    tables = 1 if spec.tie_word_embeddings else 2
    return spec.num_layers * layer_bytes(spec) + tables * 2 * spec.vocab_size * spec.hidden_size


def required_tensors(spec: ModelSpec, chunk: Chunk) -> set[Key]:
    """Every tensor the chunk's graph reads."""
    per_layer = [("attn_norm", "weight"), ("ffn_norm", "weight")]
    per_layer += [(role, "weight") for role in ("attn_q", "attn_k", "attn_v", "attn_output")]
    per_layer += [(role, "weight") for role in ("ffn_gate", "ffn_up", "ffn_down")]
    if spec.qkv_bias:
        per_layer += [("attn_q", "bias"), ("attn_k", "bias"), ("attn_v", "bias")]
    if spec.attn_output_bias:
        per_layer.append(("attn_output", "bias"))
    if spec.mlp_bias:
        per_layer += [("ffn_gate", "bias"), ("ffn_up", "bias"), ("ffn_down", "bias")]
    keys = {(role, layer, kind) for layer in chunk.layers for role, kind in per_layer}
    if chunk.first:
        keys.add(("token_embd", None, "weight"))
    if chunk.last:
        keys.add(("output_norm", None, "weight"))
        keys.add(("token_embd" if spec.tie_word_embeddings else "output", None, "weight"))
    return keys


class TensorBuffer:
    """Streamed tensors (as fp16) waiting for their chunk. Past `budget` resident bytes, new arrivals go to
    files in `spill_dir` until taken, so memory stays bounded whatever order the stream has."""

    def __init__(self, spill_dir: Path, budget: int):
        self.spill_dir = spill_dir
        self.budget = budget
        self.resident = 0
        self.spilled = 0  # tensors written to disk so far (names the next file)
        self._arrays: dict[Key, np.ndarray | Path] = {}
        self._uses: dict[Key, int] = {}

    def put(self, key: Key, array: np.ndarray, uses: int) -> None:
        """Hold `array` until it has been taken `uses` times (a tied embedding serves two chunks)."""
        if self.resident + array.nbytes > self.budget:
            self.spill_dir.mkdir(exist_ok=True)
            file = self.spill_dir / f"{self.spilled}.npy"
            np.save(file, array)
            self._arrays[key], self.spilled = file, self.spilled + 1
        else:
            self._arrays[key], self.resident = array, self.resident + array.nbytes
        self._uses[key] = uses

    def __contains__(self, key: Key) -> bool:
        return key in self._arrays

    def take(self, key: Key) -> np.ndarray:
        held = self._arrays[key]
        array = np.load(held) if isinstance(held, Path) else held
        self._uses[key] -= 1
        if not self._uses[key]:
            del self._arrays[key], self._uses[key]
            if isinstance(held, Path):
                held.unlink()
            else:
                self.resident -= held.nbytes
        return array


class CoreMLWriter(Writer):
    """Builds each chunk package as soon as the stream completes it: fp16, plus the compressed variants the
    target asks for (quantize/coreml.py); `finish` adds manifests and tokenizer files and moves the folders
    into place."""

    def __init__(self, checkpoint, target: CoreMLTarget, out_dir: Path, model_name: str):
        self.checkpoint = checkpoint
        self.spec: ModelSpec = checkpoint.spec
        self.target = target
        self.model_name = model_name
        self.block = prefill_block(target.context)
        self.chunks = plan_chunks(self.spec, target.chunks)
        self.needed = [required_tensors(self.spec, chunk) for chunk in self.chunks]
        self.built: set[int] = set()
        out_dir = Path(out_dir)
        self.folders = {p: out_dir / f"{model_name}-{p}-coreml" for p in target.precisions}
        self.work = {p: f.with_name(f".{f.name}.tmp-{os.getpid()}") for p, f in self.folders.items()}
        self.scratch = out_dir / f".{model_name}-coreml-scratch-{os.getpid()}"  # spilled tensors, functions
        self._state = "open"
        try:
            for folder in [self.scratch, *self.work.values()]:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"cannot create a Core ML work folder ({e.strerror})", out_dir) from None
        sizes = {self._key(name): 2 * int(np.prod(i.shape)) for name, i in checkpoint.tensor_infos.items()}
        largest = max(sum(sizes.get(key, 0) for key in needed) for needed in self.needed)
        self.buffer = TensorBuffer(self.scratch / "spill", budget=largest)

    def add(self, name: str, array: np.ndarray) -> None:
        if self._state != "open":
            raise RuntimeError(f"CoreMLWriter.add after {self._state}")
        key = self._key(name)
        users = [i for i, needed in enumerate(self.needed) if key in needed]
        if not users:
            return  # a stored copy of a tied head, or rotary inv_freq: the graph rebuilds these from the spec
        if key in self.buffer or any(i in self.built for i in users):
            raise CheckpointError(f"tensor {name!r} arrived twice in the stream")
        with np.errstate(over="ignore"):
            half = array.astype(np.float16)
        if not np.isfinite(half).all():
            raise CheckpointError(f"tensor {name!r} has values beyond the float16 range (±65504)")
        self.buffer.put(key, half, uses=len(users))
        for i in users:
            if all(k in self.buffer for k in self.needed[i]):
                self._build(self.chunks[i])

    def finish(self) -> list[Artifact]:
        if self._state != "open":
            raise RuntimeError(f"CoreMLWriter.finish after {self._state}")
        missing = [c.package for c in self.chunks if c.index not in self.built]
        if missing:
            raise CheckpointError(f"the tensor stream ended before {', '.join(missing)} could be built")
        self._state = "finished"
        shutil.rmtree(self.scratch, ignore_errors=True)
        options = {"compute_units": self.target.compute_units}
        for precision, work in self.work.items():
            (work / MANIFEST).write_text(json.dumps(self.manifest(precision), indent=2) + "\n")
            for file in [self.checkpoint.path / "config.json", *self.checkpoint.tokenizer_files()]:
                shutil.copy2(file, work / file.name)
            replace_atomically(work, self.folders[precision])
        return [Artifact("coreml", p, folder, options) for p, folder in self.folders.items()]

    def abort(self) -> None:
        self._state = "aborted"
        for folder in [self.scratch, *self.work.values()]:
            shutil.rmtree(folder, ignore_errors=True)

    def manifest(self, precision: str) -> dict:
        spec = self.spec
        return {
            "format": "siliconvert-coreml",
            "version": MANIFEST_VERSION,
            "model_name": self.model_name,
            "precision": precision,
            "family": spec.family,
            "context_length": self.target.context,
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size,
            "functions": {"decode": 1, "prefill": self.block},  # function name → tokens per call
            "chunks": [
                {
                    "package": chunk.package,
                    "first_layer": chunk.layers.start,
                    "num_layers": len(chunk.layers),
                    "inputs": chunk.input_names(),
                    "outputs": [chunk.output_name()],
                    "states": {name: [len(chunk.layers), spec.num_kv_heads, self.target.context,
                                      spec.head_dim] for name in ("key_cache", "value_cache")},
                }
                for chunk in self.chunks
            ],
        }

    def _build(self, chunk: Chunk) -> None:
        weights = {key: self.buffer.take(key) for key in self.needed[chunk.index]}
        packages: dict[tuple[str, str], Path] = {}  # (precision, function) → single-function package
        for function, tokens in (("decode", 1), ("prefill", self.block)):
            program = build_program(self.spec, chunk, weights, tokens, self.target.context)
            model = ct.convert(
                program,
                convert_to="mlprogram",
                minimum_deployment_target=ct.target.iOS18,  # stateful models need iOS 18 / macOS 15
                compute_precision=ct.precision.FLOAT16,
                skip_model_load=True,  # cannot load on Linux; nothing here needs the compiled model
            )
            packages["fp16", function] = self.scratch / f"{function}-fp16.mlpackage"
            model.save(str(packages["fp16", function]))
            del program, model
        del weights
        for precision in self.target.precisions[1:]:
            for function in ("decode", "prefill"):
                packages[precision, function] = self.scratch / f"{function}-{precision}.mlpackage"
                compress_function_package(packages["fp16", function], precision,
                                          packages[precision, function])
        for precision, work in self.work.items():
            descriptor = ct.utils.MultiFunctionDescriptor()
            for function in ("decode", "prefill"):
                descriptor.add_function(str(packages[precision, function]), "main", function)
            descriptor.default_function_name = "decode"
            # save_multifunction deduplicates identical consts across functions: one copy of the weights.
            ct.utils.save_multifunction(descriptor, str(work / chunk.package))
        for package in packages.values():
            shutil.rmtree(package)
        self.built.add(chunk.index)

    def _key(self, name: str) -> Key | None:
        role = self.checkpoint.family.role_of(name)
        return (role.role, role.layer, role.kind) if role else None


def prefill_block(context: int) -> int:
    """Tokens per prefill call: PREFILL_BLOCK, or the largest power of two below it that divides the
    context, so that blocks tile the cache exactly (a block never writes past the last slot)."""
    block = PREFILL_BLOCK
    while context % block:
        block //= 2
    return block


def replace_atomically(work: Path, final: Path) -> None:
    """Move a completed folder to its final name, replacing an older build only once the new one is whole."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        if final.exists():
            final.rename(old)
        work.rename(final)
    except OSError as e:
        raise OutputError(f"cannot move the Core ML package into place ({e.strerror})", final) from None
    shutil.rmtree(old, ignore_errors=True)


# ---- the graph ---------------------------------------------------------------------------------
# Activations are channels-first (1, C, 1, S), the layout the Neural Engine works in natively; linears are
# 1×1 convolutions over it (the ANE's fastest op, and no transposes between layers). Attention works per
# KV-head group in (1, kv_heads, group × S, head_dim) without repeating K and V for grouped-query heads.


def build_program(spec: ModelSpec, chunk: Chunk, weights: dict[Key, np.ndarray], tokens: int,
                  context: int) -> Program:
    """One function ("main") running `tokens` tokens through the chunk's layers."""
    h, kvh, d, layers = spec.hidden_size, spec.num_kv_heads, spec.head_dim, len(chunk.layers)
    first_input = (mb.TensorSpec((1, tokens), dtype=types.int32) if chunk.first
                   else mb.TensorSpec((1, h, 1, tokens), dtype=types.fp16))
    inputs = {
        chunk.input_names()[0]: first_input,
        "position": mb.TensorSpec((1,), dtype=types.int32),
        "key_cache": mb.StateTensorSpec((layers, kvh, context, d), dtype=types.fp16),
        "value_cache": mb.StateTensorSpec((layers, kvh, context, d), dtype=types.fp16),
    }

    def w(role: str, layer: int | None = None, kind: str = "weight") -> np.ndarray | None:
        return weights.get((role, layer, kind))

    with Function(inputs, opset_version=ct.target.iOS18) as function:
        position = function.inputs["position"]
        positions = mb.add(x=position, y=np.arange(tokens, dtype=np.int32), name="positions")  # (S,)
        cos, sin = rope_angles(spec, context, positions, tokens)
        shared = Shared(position, cos, sin, causal_mask(spec, context, positions, tokens),
                        CacheState(function.inputs["key_cache"]), CacheState(function.inputs["value_cache"]))
        if chunk.first:
            # The table as (V, C, 1, 1), the LM head's conv layout: a tied head is then the same const and
            # coremltools stores it once (when the vocabulary fits one head piece).
            table = w("token_embd")[:, :, None, None]
            x = mb.gather(x=table, indices=function.inputs["input_ids"], axis=0)  # (1, S, C, 1, 1)
            x = mb.transpose(x=mb.reshape(x=x, shape=[1, tokens, h]), perm=[0, 2, 1])
            x = mb.reshape(x=x, shape=[1, h, 1, tokens], name="embeddings")
        else:
            x = function.inputs["hidden_states"]
        for local, layer in enumerate(chunk.layers):
            attention_in = rms_norm(x, w("attn_norm", layer), spec.rms_norm_eps, f"l{layer}_attn_norm")
            x = mb.add(x=x, y=attention(spec, attention_in, w, layer, local, shared), name=f"l{layer}_attn_residual")
            mlp_in = rms_norm(x, w("ffn_norm", layer), spec.rms_norm_eps, f"l{layer}_ffn_norm")
            gate = conv(mlp_in, w("ffn_gate", layer), w("ffn_gate", layer, "bias"), f"l{layer}_ffn_gate")
            up = conv(mlp_in, w("ffn_up", layer), w("ffn_up", layer, "bias"), f"l{layer}_ffn_up")
            hidden = mb.mul(x=mb.silu(x=gate), y=up, name=f"l{layer}_ffn_act")
            down = conv(hidden, w("ffn_down", layer), w("ffn_down", layer, "bias"), f"l{layer}_ffn_down")
            x = mb.add(x=x, y=down, name=f"l{layer}_ffn_residual")
        if chunk.last:
            x = rms_norm(x, w("output_norm"), spec.rms_norm_eps, "output_norm")
            head = w("token_embd" if spec.tie_word_embeddings else "output")
            parts = [conv(x, head[i:i + HEAD_SPLIT], None, f"lm_head_{i // HEAD_SPLIT}")
                     for i in range(0, spec.vocab_size, HEAD_SPLIT)]
            x = mb.concat(values=parts, axis=1) if len(parts) > 1 else parts[0]  # (1, V, 1, S)
            out = mb.transpose(x=mb.squeeze(x=x, axes=[2]), perm=[0, 2, 1], name="logits")  # (1, S, V)
        else:
            out = mb.identity(x=x, name="hidden_states_out")
        function.set_outputs([out])
    program = Program()
    program.add_function("main", function)
    return program


def conv(x, weight: np.ndarray, bias: np.ndarray | None, name: str):
    """A linear layer as a 1×1 convolution over (1, C_in, 1, S): HF's (out, in) weight as (out, in, 1, 1)."""
    return mb.conv(x=x, weight=weight[:, :, None, None], bias=bias, name=name)


def rms_norm(x, weight: np.ndarray, eps: float, name: str):
    """RMSNorm over channels that cannot overflow fp16.

    Squaring an fp16 activation overflows past |x| = 256, and summing C squares long before that. Dividing
    each token by its max |x| first keeps every square ≤ 1 and their mean in [1/C, 1]; the factor cancels
    out of x / rms(x) except in eps, which is divided by the same factor squared.
    """
    peak = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[1], keep_dims=True), y=np.float16(NORM_FLOOR))
    scaled = mb.real_div(x=x, y=peak)
    mean_square = mb.reduce_mean(x=mb.mul(x=scaled, y=scaled), axes=[1], keep_dims=True)
    # eps / peak² as (√eps / peak)²: √eps (1e-3 for eps = 1e-6) is a normal fp16 number, eps itself is not
    root_eps = mb.real_div(x=np.float16(math.sqrt(eps)), y=peak)
    rms_inverse = mb.rsqrt(x=mb.add(x=mean_square, y=mb.mul(x=root_eps, y=root_eps)))
    normed = mb.mul(x=scaled, y=rms_inverse)
    return mb.mul(x=normed, y=weight[None, :, None, None], name=name)


class CacheState:
    """One KV state (layers, KVH, context, D) of a function, read once; each layer's write chains on the
    previous one. Re-reading the state per layer would be wrong: coremltools' remove_redundant_ops pass
    treats read_state as pure and merges repeated reads, so a later layer would write back a cache from
    before the earlier layers' writes (the MIL interpreter caught this)."""

    def __init__(self, state):
        self.state = state
        self.value = mb.read_state(input=state)

    def write(self, update, local: int, position):
        """Write (1, KVH, S, D) at [local layer, :, position:position+S]; return the layer's whole cache.
        `coreml_update_state` is what makes the write persist between calls."""
        _, kvh, context, d = self.value.shape
        begin = mb.concat(values=[np.array([local, 0], np.int32), position, np.array([0], np.int32)], axis=0)
        end = mb.add(x=begin, y=np.array([1, kvh, update.shape[2], d], np.int32))
        updated = mb.slice_update(x=self.value, update=update, begin=begin, end=end)
        self.value = mb.coreml_update_state(state=self.state, value=updated)
        return mb.slice_by_index(x=self.value, begin=[local, 0, 0, 0], end=[local + 1, kvh, context, d])


@dataclass(frozen=True)
class Shared:
    """What every layer of one function uses: the block's start position, RoPE angles, mask and caches."""

    position: object  # MIL vars throughout
    cos: object
    sin: object
    mask: object
    keys: CacheState
    values: CacheState


def attention(spec: ModelSpec, x, w, layer: int, local: int, shared: Shared):
    """Grouped-query attention over the whole cache, through the chunk's states (`local` = layer index in it)."""
    heads, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    group, s, context = heads // kvh, x.shape[-1], shared.mask.shape[-1]
    q = conv(x, w("attn_q", layer), w("attn_q", layer, "bias"), f"l{layer}_q")  # (1, H·D, 1, S)
    k = conv(x, w("attn_k", layer), w("attn_k", layer, "bias"), f"l{layer}_k")
    v = conv(x, w("attn_v", layer), w("attn_v", layer, "bias"), f"l{layer}_v")
    q = rope(mb.reshape(x=q, shape=[1, heads, d, s]), shared.cos, shared.sin)  # (1, H, D, S)
    k = rope(mb.reshape(x=k, shape=[1, kvh, d, s]), shared.cos, shared.sin)
    k = mb.transpose(x=k, perm=[0, 1, 3, 2])  # (1, KVH, S, D)
    keys = shared.keys.write(k, local, shared.position)  # (1, KVH, context, D)
    v = mb.transpose(x=mb.reshape(x=v, shape=[1, kvh, d, s]), perm=[0, 1, 3, 2])
    values = shared.values.write(v, local, shared.position)
    q = mb.mul(x=mb.transpose(x=q, perm=[0, 1, 3, 2]), y=np.float16(1 / math.sqrt(d)))  # (1, H, S, D)
    # Query heads h = kv·group + g share KV head kv: grouping rows as (kv, g·S) needs no repeated K/V.
    q = mb.reshape(x=q, shape=[1, kvh, group * s, d])
    scores = mb.matmul(x=q, y=keys, transpose_y=True)  # (1, KVH, G·S, context)
    scores = mb.add(x=mb.reshape(x=scores, shape=[1, heads, s, context]), y=shared.mask)
    probs = mb.reshape(x=mb.softmax(x=scores, axis=-1), shape=[1, kvh, group * s, context])
    out = mb.reshape(x=mb.matmul(x=probs, y=values), shape=[1, heads, s, d])
    out = mb.reshape(x=mb.transpose(x=out, perm=[0, 1, 3, 2]), shape=[1, heads * d, 1, s])
    return conv(out, w("attn_output", layer), w("attn_output", layer, "bias"), f"l{layer}_o")


def rope(x, cos, sin):
    """Rotate-half RoPE (HF's convention) on (1, N, D, S): halves of the head dimension rotate together."""
    _, n, d, s = x.shape
    x1 = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[1, n, d // 2, s])
    x2 = mb.slice_by_index(x=x, begin=[0, 0, d // 2, 0], end=[1, n, d, s])
    first = mb.sub(x=mb.mul(x=x1, y=cos), y=mb.mul(x=x2, y=sin))
    second = mb.add(x=mb.mul(x=x2, y=cos), y=mb.mul(x=x1, y=sin))
    return mb.concat(values=[first, second], axis=2)


def rope_angles(spec: ModelSpec, context: int, positions, tokens: int):
    """cos and sin (1, 1, D/2, S) for the block's positions, gathered from tables over the whole context."""
    inv_freq, attention_factor = rope_frequencies(spec, context)
    angles = inv_freq[:, None] * np.arange(context)[None, :]  # (D/2, context), computed in float64
    tables = [(np.cos(angles) * attention_factor).astype(np.float16),
              (np.sin(angles) * attention_factor).astype(np.float16)]
    half = spec.head_dim // 2
    # named consts: quantize/coreml.py keeps these exact angles in fp16
    return [mb.reshape(x=mb.gather(x=mb.const(val=table, name=f"{name}_table"), indices=positions, axis=1),
                       shape=[1, 1, half, tokens], name=name)
            for table, name in zip(tables, ("rope_cos", "rope_sin"), strict=True)]


def rope_frequencies(spec: ModelSpec, context: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the attention factor (yarn scales cos/sin), as transformers computes them."""
    d = spec.head_dim
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], float(scaling.get("factor") or 1.0)
    original = scaling.get("original_max_position_embeddings", spec.max_position_embeddings)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        if context > spec.max_position_embeddings:
            raise CheckpointError("dynamic RoPE scaling beyond max_position_embeddings is not supported "
                                  "by the Core ML target (its frequencies change with the sequence length)")
        return inv_freq, 1.0  # below that length transformers uses the unscaled frequencies
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0
    # yarn: blend interpolated and extrapolated frequencies over a ramp of dimensions; scale cos/sin
    factor = float(scaling.get("factor") or spec.max_position_embeddings / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction(rotations: float) -> float:
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(spec.rope_theta))

    low, high = correction(scaling.get("beta_fast") or 32), correction(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / (high - low if high != low else 1e-3), 0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention_factor)


def causal_mask(spec: ModelSpec, context: int, positions, tokens: int):
    """Additive mask (1, 1, S, context): 0 where key ≤ query (and within a sliding window), else MASK_VALUE.
    Slots past the sequence hold stale or zero K/V; the mask is what keeps them out."""
    key_index = np.arange(context, dtype=np.int32)[None, :]
    query = mb.reshape(x=positions, shape=[tokens, 1])
    allowed = mb.less_equal(x=key_index, y=query)
    if spec.sliding_window and spec.sliding_window < context:
        recent = mb.greater(x=key_index, y=mb.sub(x=query, y=np.int32(spec.sliding_window)))
        allowed = mb.logical_and(x=allowed, y=recent)
    # (allowed − 1) × |MASK_VALUE| rather than `select`: coremltools 9 infers select's output shape from
    # its two value operands alone, so select(cond (S, context), scalar, scalar) would claim a scalar.
    allowed = mb.cast(x=allowed, dtype="fp16")
    mask = mb.mul(x=mb.sub(x=allowed, y=np.float16(1)), y=np.float16(-MASK_VALUE))
    return mb.reshape(x=mask, shape=[1, 1, tokens, context], name="causal_mask")
