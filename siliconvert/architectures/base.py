"""What every architecture description provides: normalised hyper-parameters and tensor roles.

A family reads config.json once, here, and every target (MLX, GGUF, Core ML) reads the resulting
`ModelSpec`. Keys a family does not understand are reported, never silently dropped: a converter
that ignores a key it does not know is how rope θ went missing when transformers 5 moved it under
`rope_parameters`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from siliconvert.errors import CheckpointError, UnsupportedArchitectureError


class ConfigWarning(UserWarning):
    """A config.json key siliconvert does not understand (shown once per key)."""


@dataclass(frozen=True)
class ModelSpec:
    """Hyper-parameters of a decoder-only transformer, normalised from config.json."""

    family: str
    hf_architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q, k, v projections
    attn_output_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    # Non-default RoPE scaling as a transformers `rope_parameters`-style dict ("rope_type", "factor", ...)
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    source_dtype: str = "float32"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class TensorRole:
    """What one checkpoint tensor is: a role (named like GGUF's, e.g. "attn_q"), its layer, its kind."""

    role: str
    layer: int | None
    kind: str  # "weight" or "bias"


# Keys every family understands without acting on them: bookkeeping, training and generation settings.
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "pretraining_tp", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "bos_token_id",
    "eos_token_id", "pad_token_id", "quantization_config", "use_sliding_window", "max_window_layers",
    "layer_types", "tie_word_embeddings", "auto_map", "id2label", "label2id", "problem_type",
    "is_encoder_decoder", "chunk_size_feed_forward", "task_specific_params",
})


class Family:
    """One model family. Subclasses fill in data; override a method only where a family truly differs."""

    name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    # HF parameter name (with {layer}) → role. The GGUF role names are reused as the neutral vocabulary.
    tensor_names: ClassVar[dict[str, str]] = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "model.layers.{layer}.input_layernorm": "attn_norm",
        "model.layers.{layer}.self_attn.q_proj": "attn_q",
        "model.layers.{layer}.self_attn.k_proj": "attn_k",
        "model.layers.{layer}.self_attn.v_proj": "attn_v",
        "model.layers.{layer}.self_attn.o_proj": "attn_output",
        "model.layers.{layer}.post_attention_layernorm": "ffn_norm",
        "model.layers.{layer}.mlp.gate_proj": "ffn_gate",
        "model.layers.{layer}.mlp.up_proj": "ffn_up",
        "model.layers.{layer}.mlp.down_proj": "ffn_down",
    }
    # Keys this family reads (beyond _IGNORED_KEYS); anything else in config.json gets a warning.
    understood_keys: ClassVar[frozenset[str]] = frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias", "sliding_window",
    })
    # Tensors that some checkpoints carry but no target needs (recomputed from the config).
    droppable: ClassVar[tuple[str, ...]] = (r"\.rotary_emb\.inv_freq$",)

    # ---- hyper-parameters -------------------------------------------------------------------
    def spec(self, config: dict[str, Any], where: str = "config.json") -> ModelSpec:
        """Normalise config.json into a ModelSpec, refusing what no target could honour."""
        self._warn_unknown_keys(config, where)
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise CheckpointError(f"hidden_act {hidden_act!r} is not supported (only silu)", where)

        def need(key: str) -> Any:
            if config.get(key) is None:
                raise CheckpointError(f"missing required field {key!r}", where)
            return config[key]

        hidden_size = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        rope_theta, rope_scaling = self._rope(config, where)
        qkv_bias, attn_output_bias = self._attention_biases(config)
        spec = ModelSpec(
            family=self.name,
            hf_architecture=config.get("architectures", [self.hf_architectures[0]])[0],
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            attn_output_bias=attn_output_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=self._sliding_window(config),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            source_dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
        )
        if spec.num_heads % spec.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads ({spec.num_heads}) is not a multiple of "
                f"num_key_value_heads ({spec.num_kv_heads})",
                where,
            )
        return spec

    def _rope(self, config: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
        """rope θ and scaling, from `rope_parameters` (transformers ≥ 5) or the top level (older)."""
        params = dict(config.get("rope_parameters") or {})
        legacy_scaling = config.get("rope_scaling")
        top_theta = config.get("rope_theta")
        theta = params.pop("rope_theta", None)
        if theta is not None and top_theta is not None and float(theta) != float(top_theta):
            warnings.warn(
                f"{where}: rope_theta {top_theta} at top level disagrees with rope_parameters "
                f"({theta}); using rope_parameters, as transformers ≥ 5 does",
                ConfigWarning,
                stacklevel=2,
            )
        theta = float(theta if theta is not None else top_theta if top_theta is not None else 10000.0)
        scaling = params if params.get("rope_type", "default") != "default" else None
        if scaling is None and legacy_scaling:
            scaling = dict(legacy_scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        if scaling is not None and scaling["rope_type"] not in ("linear", "llama3", "yarn", "dynamic"):
            raise CheckpointError(f"rope scaling type {scaling['rope_type']!r} is not supported", where)
        return theta, scaling

    def _attention_biases(self, config: dict[str, Any]) -> tuple[bool, bool]:
        """(q/k/v bias, output bias). Llama's `attention_bias` switches on all four."""
        bias = bool(config.get("attention_bias", False))
        return bias, bias

    def _sliding_window(self, config: dict[str, Any]) -> int | None:
        window = config.get("sliding_window")
        return int(window) if window else None

    def _warn_unknown_keys(self, config: dict[str, Any], where: str) -> None:
        for key in sorted(set(config) - _IGNORED_KEYS - self.understood_keys):
            warnings.warn(
                f"{where}: key {key!r} is not understood by the {self.name} description; ignored",
                ConfigWarning,
                stacklevel=3,
            )

    # ---- tensors ----------------------------------------------------------------------------
    def role_of(self, name: str) -> TensorRole | None:
        """The role of an HF tensor name, or None when the family does not know it."""
        stem, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias"):
            return None
        match = _layer_pattern.match(stem)
        layer = int(match.group(1)) if match else None
        template = _layer_pattern.sub("model.layers.{layer}", stem, count=1) if match else stem
        role = self.tensor_names.get(template)
        return TensorRole(role, layer, kind) if role else None

    def is_droppable(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.droppable)

    def expected_tensors(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, with its shape (HF layout: out × in)."""
        h, q, kv, ff = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (spec.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not spec.tie_word_embeddings:
            shapes["lm_head.weight"] = (spec.vocab_size, h)
        per_layer = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (ff, h),
            "mlp.up_proj.weight": (ff, h),
            "mlp.down_proj.weight": (h, ff),
        }
        if spec.qkv_bias:
            per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)}
        if spec.attn_output_bias:
            per_layer["self_attn.o_proj.bias"] = (h,)
        if spec.mlp_bias:
            per_layer |= {"mlp.gate_proj.bias": (ff,), "mlp.up_proj.bias": (ff,), "mlp.down_proj.bias": (h,)}
        for layer in range(spec.num_layers):
            for suffix, shape in per_layer.items():
                shapes[f"model.layers.{layer}.{suffix}"] = shape
        return shapes


_layer_pattern = re.compile(r"^model\.layers\.(\d+)")


@dataclass
class Registry:
    """HF architecture name → family."""

    families: dict[str, Family] = field(default_factory=dict)

    def register(self, family_class: type[Family]) -> type[Family]:
        family = family_class()
        for arch in family_class.hf_architectures:
            self.families[arch] = family
        return family_class

    def for_config(self, config: dict[str, Any], where: str = "config.json") -> Family:
        architectures = config.get("architectures") or []
        for arch in architectures:
            if arch in self.families:
                return self.families[arch]
        model_type = config.get("model_type")
        by_type = {family.name: family for family in self.families.values()}
        if not architectures and isinstance(model_type, str) and model_type in by_type:
            # transformers' Auto classes pick the model by model_type; the architectures field is optional there
            family = by_type[model_type]
            warnings.warn(f"{where}: no 'architectures' field; read as {family.hf_architectures[0]} from "
                          f"model_type {model_type!r}, as transformers does", ConfigWarning, stacklevel=2)
            return family
        named = ", ".join(architectures) if architectures else f"no 'architectures' field, model_type {model_type!r}"
        supported = ", ".join(sorted(self.families))
        raise UnsupportedArchitectureError(f"unsupported architecture ({named}); supported: {supported}", where)
