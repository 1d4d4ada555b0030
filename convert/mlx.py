"""MLX target: an mlx-lm model folder that `mlx_lm.load` opens unchanged.

Tensors arrive one at a time. Each goes through mlx-lm's own `sanitize` (name fixes, tied heads)
and, where mlx-lm would quantize it, through `mx.quantize`; finished arrays collect into a shard
that is written once it reaches SHARD_BYTES. Memory stays near one shard, not one model.

config.json is written from the normalised ModelSpec, not copied: mlx-lm reads rope θ only from
the top level and assumes tied embeddings when the key is absent, so a transformers-5 checkpoint
(θ under `rope_parameters`, `tie_word_embeddings` omitted) would convert silently wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from siliconvert.artifacts import Artifact, Writer
from siliconvert.checkpoint import Checkpoint
from siliconvert.errors import CheckpointError
from siliconvert.quantize.mlx import QuantPolicy, quantizable_modules, quantize
from siliconvert.recipe import MLXTarget

SHARD_BYTES = 1 << 30


def mlx_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The source config with every hyper-parameter mlx-lm reads set explicitly from the spec."""
    spec = checkpoint.spec
    config = {k: v for k, v in checkpoint.config.items() if k not in ("rope_parameters", "rope_scaling")}
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
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "mlp_bias": spec.mlp_bias,
    }
    if spec.family == "llama" or spec.family == "mistral":
        if spec.qkv_bias != spec.attn_output_bias:
            raise CheckpointError("mlx-lm's llama has one attention_bias for q, k, v and o", checkpoint.path)
        config["attention_bias"] = spec.qkv_bias
    if spec.rope_scaling:
        config["rope_scaling"] = dict(spec.rope_scaling)
    return config


def build_model(config: dict[str, Any]):
    """mlx-lm's model object for `config`, unevaluated (mlx is lazy: no weights are materialised)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


class MLXWriter(Writer):
    def __init__(self, checkpoint: Checkpoint, target: MLXTarget, out_dir: Path, model_name: str):
        self.checkpoint = checkpoint
        self.target = target
        self.final_path = out_dir / f"{model_name}-mlx-{target.quant}"
        self.tmp_path = out_dir / f".{self.final_path.name}.partial"
        shutil.rmtree(self.tmp_path, ignore_errors=True)
        self.tmp_path.mkdir(parents=True)
        self.config = mlx_config(checkpoint)
        self.model = build_model(self.config)
        self.policy = QuantPolicy(target.bits, target.group_size) if target.bits != 16 else None
        self.quantized = quantizable_modules(self.model, self.policy) if self.policy else set()
        # bits 16 means float16; quantized models keep the source's float type for scales, as mlx-lm does.
        self.dtype = mx.float16 if self.policy is None else _mx_dtype(checkpoint.spec.source_dtype)
        self.shard: dict[str, mx.array] = {}
        self.shard_bytes = 0
        self.shard_names: list[list[str]] = []  # tensor names in each written shard
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        for mlx_name, weight in self.model.sanitize({name: mx.array(array)}).items():
            module, _, kind = mlx_name.rpartition(".")
            weight = weight.astype(self.dtype) if mx.issubdtype(weight.dtype, mx.floating) else weight
            if kind == "weight" and module in self.quantized:
                parts = {f"{module}.{k}": v for k, v in quantize(weight, self.policy).items()}
            else:
                parts = {mlx_name: weight}
            mx.eval(parts)
            for part_name, part in parts.items():
                self.shard[part_name] = part
                self.shard_bytes += part.nbytes
            if self.shard_bytes >= SHARD_BYTES:
                self._flush()

    def finish(self) -> list[Artifact]:
        self._flush()
        count = len(self.shard_names)
        names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for index, name in enumerate(names):
            (self.tmp_path / f"shard-{index}.safetensors").rename(self.tmp_path / name)
            for weight_name in self.shard_names[index]:
                self.weight_map[weight_name] = name
        index_data = {"metadata": {"total_size": self.total_bytes},
                      "weight_map": dict(sorted(self.weight_map.items()))}
        _write_json(self.tmp_path / "model.safetensors.index.json", index_data)
        config = dict(self.config)
        if self.policy:
            config["quantization"] = self.policy.config_entry()
            config["quantization_config"] = self.policy.config_entry()
        _write_json(self.tmp_path / "config.json", dict(sorted(config.items())))
        for file in self.checkpoint.tokenizer_files():
            shutil.copyfile(file, self.tmp_path / file.name)
        if self.final_path.exists():
            shutil.rmtree(self.final_path)
        self.tmp_path.rename(self.final_path)
        return [Artifact("mlx", self.target.quant, self.final_path)]

    def abort(self) -> None:
        shutil.rmtree(self.tmp_path, ignore_errors=True)

    def _flush(self) -> None:
        if not self.shard:
            return
        path = self.tmp_path / f"shard-{len(self.shard_names)}.safetensors"
        mx.save_safetensors(str(path), self.shard, metadata={"format": "mlx"})
        self.shard_names.append(list(self.shard))
        self.total_bytes += self.shard_bytes
        self.shard, self.shard_bytes = {}, 0


def _mx_dtype(name: str) -> mx.Dtype:
    return {"bfloat16": mx.bfloat16, "float16": mx.float16}.get(name, mx.float32)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")
