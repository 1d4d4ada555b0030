"""MLX target: an mlx-lm model folder that `mlx_lm.load` opens unchanged.

Tensors arrive one at a time. Each goes through mlx-lm's own `sanitize` (name fixes, tied heads)
and, where mlx-lm would quantize it, through `mx.quantize`, a block of rows at a time. Every output
array's name, shape and dtype are known before the first tensor arrives (mlx is lazy: sanitize and
quantize run on placeholders that are never computed), so each shard's safetensors header is written
first and its data streams in after it. Memory holds one tensor's outputs, not a shard.

config.json is written from the normalised ModelSpec, not copied: mlx-lm reads rope θ only from
the top level and assumes tied embeddings when the key is absent, so a transformers-5 checkpoint
(θ under `rope_parameters`, `tie_word_embeddings` omitted) would convert silently wrong. The traits
(windows, rope per layer, scalings, multipliers, soft-caps, experts) are written as the family's mlx-lm model
file reads them, or refused naming the trait: see mlx_arch.py.

A mixture of experts streams as transformers' stacks (router, gate_up [experts, 2·ff, in], down); each becomes
mlx-lm's SwitchGLU arrays under the model file's module (gate_up split into gate_proj and up_proj, views of the
same rows), converted a block of whole experts at a time: mlx never holds a float32 copy of a stack, and memory
holds the stream's one stack and its outputs. The routers are quantized at 8 bits (quantize/mlx.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from siliconvert import padding
from siliconvert.artifacts import Artifact, Writer
from siliconvert.calibration import BUILTIN, HESSIAN, IMPORTANCE, RANGE, SENSITIVITY, Calibration, Calibrations
from siliconvert.checkpoint import Checkpoint, TensorInfo
from siliconvert.convert.mlx_arch import LAYOUTS, ExpertLayout, MLXArch, model_file_path
from siliconvert.gains import EMBEDDING, HEAD
from siliconvert.progress import track
from siliconvert.quantize.gptq import gptq_quantize
from siliconvert.quantize.mlx import (
    MXFP4,
    QuantPolicy,
    clip_quantize,
    clip_rounding,
    gptq_error_shares,
    quantizable_modules,
    quantization_config,
    quantize,
    unfitted_modules,
    with_gptq_errors,
)
from siliconvert.quantize.plan import Plan, make_plan
from siliconvert.quantize.sensitivity import (
    MLX_CANDIDATES,
    TensorCosts,
    mlx_costs,
    mlx_option,
    role_gain,
    split_gains,
)
from siliconvert.recipe import MLXModelFile, MLXTarget

SHARD_BYTES = 1 << 30
ROW_BLOCK_BYTES = 64 << 20  # float32 source bytes converted and quantized at a time
# JSON bytes an array costs beyond twice its name ("dtype", "shape", "data_offsets" with 10-digit numbers; the
# index's quotes), and a module's entry in config.json beyond its path (indented; it is there twice, under
# "quantization" and "quantization_config")
ARRAY_ENTRY_BYTES, MODULE_ENTRY_BYTES = 100, 120
MLX_GROUP_SIZES = sorted({group for _, group in MLX_CANDIDATES})
SAFETENSORS_DTYPES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32", mx.uint8: "U8"}


# Source keys that carry traits the transformers way; mlx-lm would read some of them its own way, so only
# MLXArch's derivation of them reaches config.json
TRAIT_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "layer_types", "sliding_window", "use_sliding_window",
              "sliding_window_pattern", "no_rope_layers", "no_rope_layer_interval", "partial_rotary_factor",
              "rope_local_base_freq", "original_max_position_embeddings",
              "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
              "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size", "full_attn_idxs")


def mlx_config(checkpoint: Checkpoint, model_file: MLXModelFile = "mlx-lm") -> dict[str, Any]:
    """The source config with every hyper-parameter mlx-lm reads set explicitly from the spec: sizes here,
    traits as MLXArch writes them for the family's model file, mlx-lm's or siliconvert's (or a refusal naming the
    trait)."""
    spec = checkpoint.spec
    traits = MLXArch(spec, checkpoint.path, model_file).config()
    config = {k: v for k, v in checkpoint.config.items() if k not in TRAIT_KEYS}
    config |= {
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.rms_norm_eps,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "mlp_bias": spec.mlp_bias,
    }
    return config | traits


def build_model(config: dict[str, Any]):
    """mlx-lm's model object for `config`, unevaluated (mlx is lazy: no weights are materialised): from the model
    file config.json names (siliconvert's own, as mlx_lm.load would run it from the folder), else mlx-lm's."""
    from mlx_lm.utils import _get_classes

    if "model_file" in config:
        spec = importlib.util.spec_from_file_location("siliconvert_model_file", model_file_path(config["model_file"]))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model_class, args_class = module.Model, module.ModelArgs
    else:
        model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


@dataclass(frozen=True)
class PaddedMLP:
    """A plan's MLP padded to `width` units (siliconvert/padding.py), by module path: those whose rows are its
    units (gate and up, with their biases) and those whose columns are (down)."""

    width: int
    rows: frozenset[str]
    columns: frozenset[str]

    def touches(self, name: str) -> bool:
        return name.rpartition(".")[0] in self.rows | self.columns

    def pad(self, name: str, array: mx.array, fill: Callable[[tuple[int, ...]], mx.array] | None = None) -> mx.array:
        """An array of the model as the padded folder holds it: zeros added (to a down projection's columns
        `fill`'s values instead, for a check)."""
        module, _, kind = name.rpartition(".")
        if module in self.rows:
            axis = 0
        elif module in self.columns and kind == "weight":
            axis = array.ndim - 1
        else:
            return array
        shape = list(array.shape)
        shape[axis] = self.width - array.shape[axis]
        columns = module in self.columns and fill is not None
        added = fill(tuple(shape)) if columns else mx.zeros(shape, dtype=array.dtype)
        return mx.concatenate([array, added.astype(array.dtype)], axis=axis)


def padded_mlp(config: dict[str, Any], width: int) -> PaddedMLP | None:
    """How a plan pads an MLP of `width` units whose rows no mlx group fits, asked of mlx-lm's model: widening
    config.json's intermediate_size must widen only some modules' rows and others' columns, and one MLP so widened,
    its added rows zero and its added columns anything, must compute what it did (the added units output zero, so
    a rounded down projection's added columns cannot matter). None where it does not (no padding: those modules
    stay in float)."""
    from mlx.utils import tree_flatten

    wider_width = padding.padded_width(width)
    if wider_width is None or config.get("intermediate_size") != width:
        return None
    plain, wider = build_model(config), build_model(config | {"intermediate_size": wider_width})
    before, after = dict(tree_flatten(plain.parameters())), dict(tree_flatten(wider.parameters()))
    if before.keys() != after.keys():
        return None
    rows, columns = set(), set()
    for name, array in before.items():
        shape, module = after[name].shape, name.rpartition(".")[0]
        if shape == array.shape:
            continue
        if array.shape[0] == width and shape == (wider_width, *array.shape[1:]):
            rows.add(module)
        elif name.endswith(".weight") and array.shape[-1] == width and shape == (*array.shape[:-1], wider_width):
            columns.add(module)
        else:
            return None
    if not rows or not columns:
        return None
    mlp = PaddedMLP(wider_width, frozenset(rows), frozenset(columns))
    return mlp if _computes_the_same(mlp, plain, wider, config["hidden_size"]) else None


def _computes_the_same(mlp: PaddedMLP, plain, wider, hidden_size: int) -> bool:
    """Whether the first padded MLP, given the plain one's weights padded (its added columns random), computes what
    the plain one does on random inputs."""
    from mlx.utils import tree_flatten, tree_unflatten

    parent = min(path.rpartition(".")[0] for path in mlp.columns)
    small, large = dict(plain.named_modules())[parent], dict(wider.named_modules())[parent]
    key = iter(mx.random.split(mx.random.key(0), 64))
    padded = [(name, mlp.pad(f"{parent}.{name}", array, lambda shape: mx.random.normal(shape, key=next(key))))
              for name, array in tree_flatten(small.parameters())]
    large.update(tree_unflatten(padded))
    inputs = mx.random.normal((1, 3, hidden_size), key=next(key))
    try:
        return bool(mx.allclose(small(inputs), large(inputs), rtol=1e-4, atol=1e-5).item())
    except (TypeError, ValueError):  # a module that is not called on its input alone
        return False


@dataclass(frozen=True)
class Output:
    """One array of the MLX model, planned before its source tensor arrives."""

    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype
    shard: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.size


def calibration_needs(target: MLXTarget) -> dict[str, set[str]]:
    """Calibration text → the parts a target's writer asks for: a plan's importance (and tokens routed per expert)
    and measured gains on the builtin text, and the residual stream's range where the float type is not set
    (`_float_type`), GPTQ's second moments of each layer's inputs for `method: gptq`, and their mean squares for
    `method: clip`."""
    needs = ({IMPORTANCE, SENSITIVITY} if target.bits == "auto" else set()) | (
        {RANGE} if target.dtype is None and target.bits != 16 else set()) | (
        {HESSIAN} if target.method == "gptq" else set()) | ({IMPORTANCE} if target.method == "clip" else set())
    return {BUILTIN: needs} if needs else {}


class MLXWriter(Writer):
    """`calibration`: the run's calibrations (none: Calibrations.outside_a_run, cached in the user's cache)."""

    def __init__(self, checkpoint: Checkpoint, target: MLXTarget, out_dir: Path, model_name: str, *,
                 calibration: Calibrations | None = None):
        self.checkpoint = checkpoint
        self.target = target
        self.calibration = calibration or Calibrations.outside_a_run(checkpoint)
        self.final_path = out_dir / f"{model_name}-mlx-{target.quant}"
        self.tmp_path = out_dir / f".{self.final_path.name}.partial"
        shutil.rmtree(self.tmp_path, ignore_errors=True)
        self.tmp_path.mkdir(parents=True)
        self.config = mlx_config(checkpoint, target.model_file)
        # a plan pads an MLP whose rows no group fits, so that its down projection is planned (siliconvert/padding.py)
        self.padded = (padded_mlp(self.config, checkpoint.spec.intermediate_size)
                       if target.bits == "auto" and checkpoint.spec.experts is None else None)
        if self.padded is not None:
            self.config = self.config | {"intermediate_size": self.padded.width}
        self.model = build_model(self.config)
        self.sanitize = tensor_sanitizer(self.model, checkpoint)
        # the arrays mlx_lm.convert casts to the float type: all but those the model file keeps as they are (Qwen3.5's
        # A_log, here in float32)
        self.cast: Callable[[str], bool] = getattr(self.model, "cast_predicate", lambda name: True)
        self.quant_plan: Plan | None = None
        self.costs: list[TensorCosts] = []  # a plan's measured candidates per module
        # which modules may be quantized, each with the policy mlx-lm's rules give it (a router's 8 bits, a model
        # predicate's choice) or the target's; for a plan, any that a group of 32 fits (it picks the group size)
        bits, group_size = target.bits_and_group
        group_size = min(MLX_GROUP_SIZES) if bits == "auto" else group_size
        self.target_policy = QuantPolicy(bits if isinstance(bits, int) else 4, group_size, target.mode)
        self.quantized = (quantizable_modules(self.model, self.target_policy, self._routers())
                          if target.bits != 16 else {})
        self.float_reason = ""  # why the float type is the one it is (`_float_type`)
        self.dtype = self._float_type()
        narrower = sorted(path for path, policy in self.quantized.items()
                          if policy.group_size < self.target_policy.group_size and target.bits != "auto")
        if narrower:
            self.float_reason += (f"; {len(narrower)} layers take group {self.quantized[narrower[0]].group_size}: "
                                  f"their rows are no multiple of {self.target_policy.group_size} "
                                  f"(first: {narrower[0]})")
        if target.bits != 16 and (unfitted := unfitted_modules(self.model, self._routers(), target.mode)):
            widths = sorted({dict(self.model.named_modules())[path].weight.shape[-1] for path in unfitted})
            self.float_reason += (f"; {len(unfitted)} layers stay unquantized, in that type: their rows "
                                  f"({', '.join(map(str, widths))} wide) fit none of {target.mode}'s group sizes "
                                  f"(first: {unfitted[0]})")
        # GPTQ's H per HF weight name (none for rtn); a tied embedding is rounded as the head, against its inputs
        self.hessians = self.calibration.hessians(BUILTIN) if target.method == "gptq" else {}
        if checkpoint.spec.tie_word_embeddings and HEAD in self.hessians:
            self.hessians = self.hessians | {name: self.hessians[HEAD] for name, info in checkpoint.tensor_infos.items()
                                             if info.role is not None and info.role.role == "token_embd"}
        # the inputs' mean square per column that `method: clip` weighs each group's error by, per HF weight name
        self.clip_importance = self._clip_importance() if target.method == "clip" else {}
        # module path → how it is quantized; `policy` is config.json's default (the most common one)
        self.policies = self._module_policies() | self._kept_mxfp4()
        self.policy = _most_common(self.policies) if self.policies else None
        self.plan = self._plan()
        self.shards = max((o.shard for outputs in self.plan.values() for o in outputs), default=0) + 1
        self.file: BinaryIO | None = None
        self.shard = -1  # the shard being written

    def add(self, info: TensorInfo, array: np.ndarray) -> None:
        name = info.name
        outputs = self.plan.get(name)
        if outputs is None:
            raise ValueError(f"MLX writer got an unexpected tensor {name!r}")
        produced = self._convert(name, array)
        for output in outputs:
            if output.shard != self.shard:
                self._open_shard(output.shard)
            parts = produced[output.name]
            if sum(p.nbytes for p in parts) != output.nbytes:  # the header already promised this size
                raise ValueError(f"MLX writer planned {output.name} as {output.shape} {output.dtype}")
            for part in parts:
                self.file.write(memoryview(np.ascontiguousarray(part)).cast("B"))

    def finish(self) -> list[Artifact]:
        self._close_shard()
        if self.shard != self.shards - 1:
            raise ValueError("MLX writer finished before every tensor arrived")
        weight_map = {o.name: self._shard_name(o.shard) for outputs in self.plan.values() for o in outputs}
        total = sum(o.nbytes for outputs in self.plan.values() for o in outputs)
        index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(self.tmp_path / "model.safetensors.index.json", index_data)
        config = dict(self.config)
        if self.policy:
            # mlx_lm.load reads a module's own entry before the default: routers, a plan's or a mixed recipe's choices
            config["quantization"] = quantization_config(self.policy, self.policies)
            config["quantization_config"] = config["quantization"]
        _write_json(self.tmp_path / "config.json", dict(sorted(config.items())))
        for file in self.checkpoint.tokenizer_files():
            shutil.copyfile(file, self.tmp_path / file.name)
        if "model_file" in config:
            shutil.copyfile(model_file_path(config["model_file"]), self.tmp_path / config["model_file"])
        if self.final_path.exists():
            shutil.rmtree(self.final_path)
        self.tmp_path.rename(self.final_path)
        plan = None
        float_type = {"dtype": str(self.dtype).rpartition(".")[2], "reason": self.float_reason}
        if self.quant_plan:
            plan = self.quant_plan.summary() | {"float_type": float_type["dtype"],
                                                "float_type_reason": float_type["reason"]}
            if self.padded is not None:
                plan["padded_ffn"] = padding.why(self.checkpoint.spec.intermediate_size, self.padded.width, "mlx")
        return [Artifact("mlx", self.target.quant, self.final_path, plan=plan, float_type=float_type,
                         source_quantization=self._arrived_statement())]

    def _arrived_statement(self) -> str | None:
        """How the folder stores the modules whose weights arrived as MXFP4: kept, or re-quantized as what."""
        quantization = self.checkpoint.quantization
        if quantization is None or quantization.method != "mxfp4":
            return None
        kept = self._kept_mxfp4()
        arrived = {mlx_name.rpartition(".")[0] for name in quantization.tensors
                   for mlx_name in self.sanitize({name: mx.zeros(self.checkpoint.tensor_infos[name].shape)})}
        if len(kept) == len(arrived):
            return f"MXFP4 kept exact in {len(kept)} modules (mlx's mxfp4 mode)"
        if self.target.bits == 16:
            return (f"MXFP4 stored as {str(self.dtype).rpartition('.')[2]} in {len(arrived)} modules: each value "
                    "exact wherever the type's range holds it")
        stored = sorted({f"{self.policies[m].bits}-bit {self.policies[m].mode}" if m in self.policies
                         else str(self.dtype).rpartition(".")[2] for m in arrived - kept.keys()})
        return (f"MXFP4 re-quantized in {len(arrived) - len(kept)} of {len(arrived)} modules (as "
                f"{', '.join(stored)})")

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        shutil.rmtree(self.tmp_path, ignore_errors=True)

    # ---- plan --------------------------------------------------------------------------------------
    def _float_type(self) -> mx.Dtype:
        """The float type of the folder's unquantized arrays, scales and biases, which mlx computes in (see
        MLXTarget.dtype), and why (`float_reason`). On a bfloat16 source any target but bits 16 takes float16 when
        the residual stream's calibrated peak leaves float16 its headroom (FP16Range in siliconvert/calibration.py:
        the check the Core ML writer makes): the same bytes, and activations rounded 8× finer; mlx_lm.convert keeps
        the source's bfloat16. Measured (1024 tokens, mlx's products summed in float32 as on Apple GPUs: engine
        mlx-dequantized): the small Qwen3 test checkpoint's 8-bit g64 from mean KLD 0.00004 to 0.00001, the demo's
        4-bit g64 0.00322 either way. mlx's CPU quantized kernels sum in the activations' type, and there bfloat16
        costs far more: 0.00052 against 0.00002, and 0.0049 against 0.0032."""
        if self.target.dtype is not None:
            self.float_reason = f"{self.target.dtype}, as the recipe's dtype asks"
            return getattr(mx, self.target.dtype)
        if self.target.bits == 16:
            self.float_reason = "float16, as for every unquantized MLX target without a dtype"
            return mx.float16
        source = _mx_dtype(self.checkpoint.spec.source_dtype)
        if source != mx.bfloat16:
            self.float_reason = f"{str(source).rpartition('.')[2]}, as the source"
            return source
        fp16 = self.calibration.fp16_range()
        if fp16.scale < 1:
            self.float_reason = (f"bfloat16, as the source: its residual stream peaks at {fp16.peak:.0f}, too near "
                                 "float16's limit")
            return source
        self.float_reason = f"float16 for the source's bfloat16: the residual stream peaks at {fp16.peak:.1f}"
        return mx.float16

    def _routers(self) -> set[str]:
        """mlx-lm's module paths of the mixture of experts' routers and shared experts' gates (none in a dense
        model)."""
        routers = set()
        for info in self.checkpoint.stream_order():
            if info.role.role in ("ffn_gate_inp", "ffn_gate_inp_shexp"):
                placeholder = mx.zeros(info.shape, dtype=mx.float32)
                routers |= {name.rpartition(".")[0] for name in self.sanitize({info.name: placeholder})}
        return routers

    def _kept_mxfp4(self) -> dict[str, QuantPolicy]:
        """The modules whose weights arrived as MXFP4 (an MXFP4 source's expert stacks), kept in mlx's mxfp4 mode
        wherever the target quantizes them at 4 bits or more: mlx's mxfp4 is the hub's own encoding (E2M1 values,
        the low nibble first, an E8M0 scale per 32), so each value stays the source's (4.25 bits per weight, less
        than affine 4-bit's 4.5). A narrower target re-quantizes them as it asks."""
        quantization = self.checkpoint.quantization
        if quantization is None or quantization.method != "mxfp4" or self.target.bits == 16:
            return {}
        kept = {}
        for name in quantization.tensors:
            placeholder = mx.zeros(self.checkpoint.tensor_infos[name].shape, dtype=mx.float32)
            for mlx_name in self.sanitize({name: placeholder}):
                module = mlx_name.rpartition(".")[0]
                if module in self.quantized and self._policy_bits(module) >= MXFP4.bits:
                    kept[module] = MXFP4
        return kept

    def _policy_bits(self, module: str) -> float:
        """Bits per weight the target gives `module` (a plan gives any: counted as 4)."""
        bits = self.target.bits
        return self.quantized[module].bits if isinstance(bits, int) else 4

    def _module_policies(self) -> dict[str, QuantPolicy]:
        """How each quantized module is stored: the target's width, a plan's choice, or mlx-lm's mixed recipe's;
        a module mlx-lm's rules set apart (a router at 8 bits, a model predicate's choice) keeps its own."""
        bits = self.target.bits
        own = {path: policy for path, policy in self.quantized.items() if policy != self.target_policy}
        if bits == "auto":
            return self._planned() | own
        if isinstance(bits, str):
            from mlx_lm.convert import mixed_quant_predicate_builder

            predicate = mixed_quant_predicate_builder(bits, self.model, self.target.group_size)
            modules = dict(self.model.named_modules())
            return {path: QuantPolicy(entry["bits"], entry["group_size"], entry["mode"])
                    for path in sorted(self.quantized) if (entry := predicate(path, modules[path]))} | own
        return dict(self.quantized)

    def _planned(self) -> dict[str, QuantPolicy]:
        """Each quantizable module's bits and group size, as quantize/plan.py picks them from measured costs
        (a read of the weights before the conversion's, one tensor at a time). An expert stack (a switch_mlp
        module) takes one width for all its experts, each weighed by the calibration tokens routed to it; the
        routers and a shared expert's gate are not planned (they keep ROUTER's 8 bits)."""
        importance = self.calibration.importance(BUILTIN)
        routed = self.calibration.expert_tokens(BUILTIN)  # per expert stack, from the same run
        measured = self.calibration.get(BUILTIN, {SENSITIVITY})
        tied = self.checkpoint.spec.tie_word_embeddings
        # bytes beside the planned weights: tokenizer files, config.json, and per array its safetensors header
        # and index entries (counted as each array arrives, over-estimated a little: a size goal is a limit)
        costs = []
        fixed = sum(f.stat().st_size for f in self.checkpoint.tokenizer_files())
        fixed += len(json.dumps(self.config, indent=4))
        stream = track(self.checkpoint.tensors(), "measuring MLX widths per module",
                       total=len(self.checkpoint.tensor_infos))
        for info, array in stream:
            source_name = info.name
            sanitized = self._sanitized(source_name, mx.array(array))
            gains = self._gains(info, sanitized, importance, measured)
            for mlx_name, weight in sanitized.items():
                module, _, kind = mlx_name.rpartition(".")
                fixed += _json_bytes(mlx_name)
                policy = self.quantized.get(module)
                if kind == "weight" and policy is not None and policy != self.target_policy:
                    fixed += _quantized_bytes(weight.size, policy, self.dtype.size)  # at its own width: not planned
                    fixed += 2 * _json_bytes(mlx_name) + 2 * (len(module) + MODULE_ENTRY_BYTES)
                    continue
                if kind != "weight" or policy is None:  # not quantized
                    fixed += weight.size * (self.dtype.size if mx.issubdtype(weight.dtype, mx.floating)
                                            else weight.dtype.size)
                    continue
                # a tied embedding is the head too: its columns are weighed by the head's inputs; an expert stack's
                # gate, up and down take their stack's rows (gate and up read the same inputs)
                weights = importance.get(mlx_name, importance.get("lm_head.weight") if tied else None)
                if source_name in routed:
                    weights = importance[source_name]
                weights = padding.padded_columns(weights, weight.shape[-1])
                fixed += 2 * _json_bytes(mlx_name) + 2 * (len(module) + MODULE_ENTRY_BYTES)  # scales, biases; config
                gain, shrink_gain = gains[mlx_name]
                clipped = self.target.method == "clip"
                rounding = clip_rounding(self._clip_columns(source_name, weight.shape[-1])) if clipped else None
                costs.append(mlx_costs(module, np.asarray(weight.astype(mx.float32)), weights, self.dtype.size, gain,
                                       routed_tokens=routed.get(source_name), shrink_gain=shrink_gain,
                                       affine_rounding=rounding))
                # rounded by GPTQ, a module's errors shrink by what GPTQ measures on it; a tied embedding's only in
                # its part as the head: its rows are looked up too, where GPTQ's carried errors do not cancel
                hessian = self._hessian(source_name, weight.shape[-1])
                if hessian is not None and weight.ndim == 2 and hessian.shape[0] == weight.shape[-1]:
                    shares = gptq_error_shares(np.asarray(weight.astype(mx.float32)), hessian, self.dtype,
                                               MLX_CANDIDATES)
                    looked_up = _looked_up_share(measured) if info.role.role == "token_embd" else 0.0
                    costs[-1] = with_gptq_errors(costs[-1], shares, looked_up)
        self.costs, self.quant_plan = costs, make_plan(costs, self.target.plan, fixed_bytes=fixed)
        return {module: QuantPolicy(*mlx_option(option.kind)) for module, option in self.quant_plan.choices.items()}

    def _sanitized(self, name: str, weight: mx.array) -> dict[str, mx.array]:
        """mlx-lm's arrays for one source tensor, as the folder holds them before the float type and quantization:
        an MLP a plan pads, padded."""
        arrays = self.sanitize({name: weight})
        if self.padded is None:
            return arrays
        return {mlx_name: self.padded.pad(mlx_name, array) for mlx_name, array in arrays.items()}

    def _hessian(self, name: str, width: int) -> np.ndarray | None:
        """GPTQ's H for a source weight read by `width` columns: a padded down projection's padded with zeros (its
        added inputs are zero; GPTQ's damping keeps H invertible)."""
        hessian = self.hessians.get(name)
        if hessian is None or hessian.shape[0] >= width:
            return hessian
        return np.pad(hessian, (0, width - hessian.shape[0]))

    def _clip_columns(self, name: str, width: int) -> np.ndarray | None:
        return padding.padded_columns(self.clip_importance.get(name), width)

    def _clip_importance(self) -> dict[str, np.ndarray]:
        """Per HF weight name, the mean square of each input column on the calibration text. A tied embedding's
        rows are looked up as well as multiplied by the head's inputs: its columns are weighed by those inputs
        normalised, plus one, so that neither use's error is left out of its groups' search."""
        importance = dict(self.calibration.importance(BUILTIN))
        head = importance.get("lm_head.weight")
        if self.checkpoint.spec.tie_word_embeddings and head is not None:
            for name, info in self.checkpoint.tensor_infos.items():
                if info.role is not None and info.role.role == "token_embd":
                    importance[name] = head / max(float(np.mean(head)), 1e-30) + 1.0
        return importance

    def _gains(self, info: TensorInfo, sanitized: dict[str, mx.array], importance: dict[str, np.ndarray],
               measured: Calibration) -> dict[str, tuple[float, float | None]]:
        """Each planned MLX weight's (gain, shrink gain) to the mean KLD, by its name: the ones measured on this
        model for its source tensor (split by share where mlx-lm stores it as parts), or, for a weight the
        sensitivity forward did not measure, its role's gain fitted on the demo model (no shrink gain)."""
        tied = self.checkpoint.spec.tie_word_embeddings
        weights = {name: value for name, value in sanitized.items() if name.endswith(".weight")}
        gain, shrink_gain = measured.gain(info.name, tied), measured.shrink_gain(info.name, tied)
        if gain is None:
            return dict.fromkeys(weights, (role_gain(info.role.role, tied), None))
        parts = [np.asarray(value.astype(mx.float32)) for value in weights.values()] if len(weights) > 1 else []
        columns = [importance.get(info.name)] * len(parts)

        def split(whole: float | None) -> list[float | None]:
            if whole is None:
                return [None] * len(weights)
            return split_gains(whole, parts, columns) if parts else [whole]

        return dict(zip(weights, zip(split(gain), split(shrink_gain), strict=True), strict=True))

    def _plan(self) -> dict[str, list[Output]]:
        """Every output array, per source tensor, in stream order, assigned to shards of ≤ SHARD_BYTES.
        mlx's laziness gives the shapes: nothing here is computed."""
        plan: dict[str, list[Output]] = {}
        shard, shard_bytes = 0, 0
        for info in self.checkpoint.stream_order():
            placeholder = mx.zeros(info.shape, dtype=mx.float32)
            outputs = []
            for name, array in self._transform(info.name, placeholder, planning=True).items():
                if shard_bytes and shard_bytes + array.nbytes > SHARD_BYTES:
                    shard, shard_bytes = shard + 1, 0
                outputs.append(Output(name, tuple(array.shape), array.dtype, shard))
                shard_bytes += array.nbytes
            plan[info.name] = outputs
        return plan

    def _transform(self, name: str, weight: mx.array, planning: bool = False) -> dict[str, mx.array]:
        """mlx-lm's arrays for one source tensor: sanitized, cast, and quantized where mlx-lm would (by GPTQ where
        the target asks and the source weight's inputs were measured). `planning`: shapes only, on a placeholder
        never computed (GPTQ's arrays are mx.quantize's shapes)."""
        out = {}
        for mlx_name, array in self._sanitized(name, weight).items():
            module, _, kind = mlx_name.rpartition(".")
            if mx.issubdtype(array.dtype, mx.floating) and self.cast(mlx_name):
                array = array.astype(self.dtype)
            if kind == "weight" and module in self.policies:
                policy = self.policies[module]
                hessian = None if planning or policy.mode != "affine" else self._hessian(name, array.shape[-1])
                if hessian is not None and hessian.shape[0] == array.shape[-1]:
                    quantized = gptq_quantize(np.asarray(array.astype(mx.float32)), hessian, policy.bits,
                                              policy.group_size, self.dtype)
                elif self.target.method == "clip" and policy.mode == "affine" and not planning:
                    quantized = clip_quantize(array, policy, self._clip_columns(name, array.shape[-1]))
                else:
                    quantized = quantize(array, policy)
                out |= {f"{module}.{k}": v for k, v in quantized.items()}
            else:
                out[mlx_name] = array
        return out

    # ---- conversion ----------------------------------------------------------------------------------
    def _convert(self, name: str, array: np.ndarray) -> dict[str, list[np.ndarray]]:
        """The tensor's outputs, each as row blocks in order. A tensor that sanitize only renames (or drops, or
        splits within each row: an expert stack's gate and up) is converted ROW_BLOCK_BYTES at a time (an expert
        stack's rows are its experts), so mlx never holds a float32 copy of a big tensor; any other sanitize
        gets the whole tensor."""
        padded = self.padded is not None and any(self.padded.touches(o.name) for o in self.plan[name])
        if array.ndim < 2 or padded or not _rows_independent(self.sanitize, name, array.shape):
            whole = self._transform(name, mx.array(array))
            mx.eval(whole)
            return {k: [_as_numpy(v)] for k, v in whole.items()}
        rows = max(1, ROW_BLOCK_BYTES // max(1, array[0].nbytes))
        parts: dict[str, list[np.ndarray]] = {o.name: [] for o in self.plan[name]}
        for start in range(0, array.shape[0], rows):
            block = self._transform(name, mx.array(array[start:start + rows]))
            mx.eval(block)
            for k, v in block.items():
                parts[k].append(_as_numpy(v))
        return parts

    # ---- files -------------------------------------------------------------------------------------
    def _shard_name(self, shard: int) -> str:
        return "model.safetensors" if self.shards == 1 else f"model-{shard + 1:05d}-of-{self.shards:05d}.safetensors"

    def _open_shard(self, shard: int) -> None:
        """Close the current shard and start `shard`: its whole header first (names, shapes, offsets)."""
        self._close_shard()
        self.shard = shard
        header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for output in (o for outputs in self.plan.values() for o in outputs if o.shard == shard):
            header[output.name] = {"dtype": SAFETENSORS_DTYPES[output.dtype], "shape": list(output.shape),
                                   "data_offsets": [offset, offset + output.nbytes]}
            offset += output.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as safetensors pads
        self.file = (self.tmp_path / self._shard_name(shard)).open("wb")
        self.file.write(len(encoded).to_bytes(8, "little") + encoded)

    def _close_shard(self) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the folder is renamed into place
        self.file.close()
        self.file = None


def tensor_sanitizer(model, checkpoint: Checkpoint) -> Callable[[dict[str, mx.array]], dict[str, mx.array]]:
    """mlx-lm's `sanitize` for tensors given one at a time, after the experts are named as its model file holds
    them (`switch_mlp`). Where the model file has no sanitize, or has one that cannot take the tensors so (it
    looks at the whole set), only the experts' names. A tied head's stored copy never comes (the checkpoint
    drops it): a model file whose sanitize keeps it (OLMoE's) would not load with it."""
    spec = checkpoint.spec
    layout = LAYOUTS[spec.family]
    sanitize = getattr(model, "sanitize", None)
    if sanitize is None or not layout.sanitize_per_tensor:
        sanitize = dict
    experts: Callable[[dict[str, mx.array]], dict[str, mx.array]] = dict
    if spec.experts and layout.experts:
        experts = ExpertArrays(checkpoint, layout.experts)
    elif layout.experts and layout.experts.dense_module:
        experts = DenseMLPArrays(checkpoint, layout.experts.dense_module)
    mixers = MixerArrays(checkpoint) if layout.folds_norm_offset else dict

    def sanitize_one(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return sanitize(experts(mixers(weights)))
    return sanitize_one


class MixerArrays:
    """What mlx-lm's qwen3_5 and qwen3_next sanitize do to a whole set of tensors (and skip for a set without a
    conv kernel in torch's axis order, or without per-expert tensors), done to each tensor: every norm's offset
    folded into its weight (1 + w: the model file multiplies by the weight as stored; the gated delta rule's own norm
    has none), the gated delta rule's conv kernel in mlx's axis order ([channels, kernel, 1] for torch's
    [channels, 1, kernel])."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.spec = checkpoint.spec
        self.roles = {name: info.role.role for name, info in checkpoint.tensor_infos.items()}

    def __call__(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for name, array in weights.items():
            role = self.roles[name]
            if role.endswith("_norm") and (offset := self.spec.norm_offset_of(role)):
                array = array.astype(mx.float32) + offset
            elif role == "ssm_conv1d":
                array = array.swapaxes(1, 2)
            out[name] = array
        return out


class ExpertArrays:
    """transformers' expert tensors as mlx-lm's MoE files hold them, under the layer's `module`: the router as
    `gate`, the stacks as `switch_mlp`'s gate_proj, up_proj and down_proj ([experts, out, in] each: gate_up's
    rows split, per expert, into the gate's then the up's). mlx-lm's own sanitize does this for per-expert
    files only, and for Mixtral only from a set holding layer 0: it cannot take transformers' stacks."""

    def __init__(self, checkpoint: Checkpoint, layout: ExpertLayout) -> None:
        self.roles = {name: info.role for name, info in checkpoint.tensor_infos.items()}
        self.module, self.router, self.stacks = layout.module, layout.router, layout.stacks
        self.scales = dict(zip(("ffn_gate_inp_scale", "ffn_exps_scale"), layout.router_scales or (), strict=False))
        self.ff = checkpoint.spec.experts.intermediate_size

    def __call__(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for name, array in weights.items():
            role = self.roles[name]
            module = f"model.layers.{role.layer}" + (f".{self.module}" if self.module else "")
            if role.role in self.scales:  # a router's own scale (Gemma 4's), a parameter without a suffix
                out[f"{module}.{self.scales[role.role]}"] = array
            elif role.role not in ("ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps"):
                out[name] = array
            elif role.role == "ffn_gate_inp":
                out[f"{module}.{self.router}.{role.kind}"] = array
            elif role.role == "ffn_gate_up_exps":  # a stack [experts, 2·ff, in], or its bias [experts, 2·ff]
                out[f"{module}.{self.stacks}.gate_proj.{role.kind}"] = array[:, :self.ff]
                out[f"{module}.{self.stacks}.up_proj.{role.kind}"] = array[:, self.ff:]
            else:
                out[f"{module}.{self.stacks}.down_proj.{role.kind}"] = array
        return out


# A dense MLP's roles as mlx-lm's Linear names under its MLP module
DENSE_PROJECTIONS = {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


class DenseMLPArrays:
    """A source without experts as a model file that runs, then, a dense MLP under `module` (gate_proj, up_proj,
    down_proj: mlx-lm's granitemoehybrid), where its MLP has other names (Granite 4.0-H's shared_mlp, gate and up
    fused: the gate's rows, then the up's). mlx-lm's own sanitize does this only from a set holding layer 0."""

    def __init__(self, checkpoint: Checkpoint, module: str) -> None:
        self.roles = {name: info.role for name, info in checkpoint.tensor_infos.items()}
        self.module = module
        self.ff = checkpoint.spec.intermediate_size

    def __call__(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out = {}
        for name, array in weights.items():
            role = self.roles[name]
            module = f"model.layers.{role.layer}.{self.module}"
            if role.role == "ffn_gate_up":
                out[f"{module}.gate_proj.{role.kind}"] = array[:self.ff]
                out[f"{module}.up_proj.{role.kind}"] = array[self.ff:]
            elif role.role in DENSE_PROJECTIONS:
                out[f"{module}.{DENSE_PROJECTIONS[role.role]}.{role.kind}"] = array
            else:
                out[name] = array
        return out


def _rows_independent(sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]], name: str,
                      shape: tuple[int, ...]) -> bool:
    """Whether sanitize maps this tensor to arrays that keep its rows (its leading axis) and together hold its
    values, as the renames and drops of the llama-like families and the split of the experts' gate and up do:
    then its rows can be converted block by block and give what the whole tensor gives (quantization groups
    lie within rows). A sanitize that reshapes across rows gets the whole tensor."""
    mapped = sanitize({name: mx.zeros(shape, dtype=mx.float32)}).values()
    return (len(mapped) > 0 and all(array.shape[0] == shape[0] for array in mapped)
            and sum(array.size for array in mapped) == int(np.prod(shape)))


def _as_numpy(array: mx.array) -> np.ndarray:
    # numpy has no bfloat16: its bits travel as uint16
    return np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)


def _looked_up_share(measured: Calibration) -> float:
    """Of a tied embedding's gain to the mean KLD, the part it has as the embedding looked up (the rest it has as
    the head): measured on this model where the sensitivity forward ran, else the roles' fitted gains."""
    lookup, both = measured.gain(EMBEDDING), measured.gain(EMBEDDING, tied_head=True)
    if lookup is None or both is None or both <= 0:
        lookup, both = role_gain("token_embd"), role_gain("token_embd", tied_head=True)
    return lookup / both if both > 0 else 1.0


def _most_common(policies: dict[str, QuantPolicy]) -> QuantPolicy:
    counts: dict[QuantPolicy, int] = {}
    for policy in policies.values():
        counts[policy] = counts.get(policy, 0) + 1
    return max(sorted(counts, key=lambda p: (p.bits, p.group_size)), key=counts.get)


def _json_bytes(name: str) -> int:
    """An upper bound on one array's entries in the safetensors header and in the index's weight map."""
    return 2 * len(name) + ARRAY_ENTRY_BYTES


def _quantized_bytes(size: int, policy: QuantPolicy, scale_bytes: int) -> int:
    """Bytes of a weight of `size` values quantized at `policy`: packed values, a scale and a bias per group (a
    float mode's: one 8-bit scale)."""
    per_group = 2 * scale_bytes if policy.mode == "affine" else 1
    return size * policy.bits // 8 + (size // policy.group_size) * per_group


def _mx_dtype(name: str) -> mx.Dtype:
    return {"bfloat16": mx.bfloat16, "float16": mx.float16}.get(name, mx.float32)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")
