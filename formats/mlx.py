"""MLX: a folder mlx_lm.load opens unchanged (mlx-lm's layout and config.json); one release folder per artifact."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from siliconvert.artifacts import CARD_PROMPT, Artifact, Release, Writer
from siliconvert.calibration import Calibrations
from siliconvert.checkpoint import Checkpoint, load_json
from siliconvert.errors import ArtifactError, short
from siliconvert.format import Format, artifact_bytes
from siliconvert.recipe import MLX_MODES, MLXModelFile, MLXTarget, QuantPlan

# what a sweep builds: mlx-lm's recipes at its group size 64 (plans aim at the widths'), rounded by GPTQ, 4-bit
# clipped, and the float modes at their own groups
FIXED_OPTIONS = ({"bits": 3}, {"bits": 4}, {"bits": 6}, {"bits": 8}, {"bits": "mixed_3_6"}, {"bits": "mixed_4_6"},
                 {"bits": 3, "method": "gptq"}, {"bits": 4, "method": "gptq"}, {"bits": 4, "method": "clip"},
                 {"mode": "mxfp4"}, {"mode": "nvfp4"}, {"mode": "mxfp8"})
PLANNED_AT = (3, 4, 6)  # the affine widths whose sizes a sweep's plans aim at


def _grouped(options: dict) -> dict:
    """A sweep's fixed MLX options at mlx-lm's group size 64; a float mode keeps its own group."""
    return options if "mode" in options else {**options, "group_size": 64}


class MLX(Format):
    name = "mlx"
    target = MLXTarget
    runner = "siliconvert.validate.runners.mlx:MLXRunner"
    library = "mlx"
    tags = ("mlx",)
    looks_like = "an MLX folder"
    fixed_quants = tuple(MLXTarget(format="mlx", **_grouped(options)).quant for options in FIXED_OPTIONS)
    planned_at = tuple(MLXTarget(format="mlx", bits=bits, group_size=64).quant for bits in PLANNED_AT)
    anchor = "4bit-g64"
    plan_bits = (2.25, 9.0)  # 2 bits in groups of 128 to 8 in groups of 32, a float16 scale and bias per group

    def writer(self, checkpoint: Checkpoint, target: MLXTarget, out_dir: Path, model_name: str,
               calibration: Calibrations) -> Writer:
        from siliconvert.convert.mlx import MLXWriter

        return MLXWriter(checkpoint, target, out_dir, model_name, calibration=calibration)

    def calibration_needs(self, target: MLXTarget) -> dict[str, set[str]]:
        from siliconvert.convert.mlx import calibration_needs

        return calibration_needs(target)

    def detect(self, path: Path) -> Artifact | None:
        shards = sorted(path.glob("model*.safetensors")) if path.is_dir() else []
        if not shards or _safetensors_format(shards[0]) != "mlx":
            return None
        quantization = _config(path).get("quantization")
        if isinstance(quantization, dict) and quantization.get("mode", "affine") in MLX_MODES:
            return Artifact(self.name, quantization["mode"], path)
        if isinstance(quantization, dict) and {"bits", "group_size"} <= set(quantization):
            return Artifact(self.name, f"{quantization['bits']}bit-g{quantization['group_size']}", path)
        return Artifact(self.name, "fp16", path)

    def check(self, artifact: Artifact) -> None:
        config = _config(artifact.path)
        if not any((artifact.path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            raise ArtifactError("no tokenizer (neither tokenizer.json nor tokenizer.model; mlx_lm.load reads it "
                                "from the folder)", artifact.path)
        index = artifact.path / "model.safetensors.index.json"
        if index.is_file():
            listed = load_json(index.read_bytes(), index.name, index)
            weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
            shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
            if missing := sorted(map(str, shards - {p.name for p in artifact.path.glob("*.safetensors")})):
                raise ArtifactError(f"shard {short(missing[0])} is listed but missing", index)
        model_file = config.get("model_file")
        if model_file is not None and not (artifact.path / str(model_file)).is_file():
            raise ArtifactError(f"config.json names the model file {model_file!r}, which is missing (mlx_lm.load "
                                "builds the model from it)", artifact.path)
        shapes: dict[str, tuple[list[int], Path]] = {}  # tensor → (shape, its shard)
        for shard in sorted(artifact.path.glob("model*.safetensors")):
            shapes |= {name: (shape, shard) for name, shape in _shard_shapes(shard).items()}
        for name, (shape, shard) in shapes.items():
            _check_shape(name, shape, shard, shapes, config)

    def vocab_size(self, artifact: Artifact) -> int | None:
        rows = _config(artifact.path).get("vocab_size")
        return rows if isinstance(rows, int) else None

    def validation_memory(self, artifact: Artifact, gpu: bool) -> tuple[int, int]:
        # on a GPU mlx-lm holds the folder's arrays as they are; on mlx's CPU what the runner holds (`held_bytes`:
        # quantized weights also dequantized, float layers also widened to float32)
        size = artifact_bytes(artifact.path)
        if gpu:
            return size, size
        from siliconvert.validate.runners.mlx import held_bytes

        return held_bytes(artifact.path, _config(artifact.path)), 0

    def describe(self, artifact: Artifact) -> dict[str, Any]:
        config = _config(artifact.path)
        return {"quantization": config.get("quantization"), "model_type": config.get("model_type")}

    def sweep_fixed(self, targets: Sequence[MLXTarget], quants: Sequence[str]) -> list[MLXTarget]:
        fixed = [MLXTarget(format=self.name, model_file=_model_file(targets), **_grouped(options))
                 for options in FIXED_OPTIONS]
        return [target for target in fixed if target.quant in quants]

    def sweep_planned(self, targets: Sequence[MLXTarget], plan: QuantPlan) -> MLXTarget:
        return MLXTarget(format=self.name, bits="auto", plan=plan, model_file=_model_file(targets))

    def aims_at(self, quant: str) -> bool:
        return quant in self.planned_at  # the mixed recipes, GPTQ's and the modes sit between the widths

    def release_name(self, model: str, quant: str) -> str:
        # MLX quants read "4bit-g64", "8bit-g32-bf16", "fp16"; Hub names leave out mlx-lm's default group size.
        return f"{model}-{quant.replace('-g64', '', 1)}"

    def summary(self, release: Release) -> str:
        entry = release.shipped[0]
        quant = entry["quant"]
        plan = entry.get("plan")
        dtype = (entry.get("float_type") or {}).get("dtype") or (plan or {}).get("float_type")
        floats = f", {dtype} elsewhere" if dtype else ""
        if plan:
            return f"MLX weights quantized per module by plan ({plan['bits_per_weight']:.2f} bits per weight{floats})"
        if quant.startswith("mixed_"):
            return f"MLX weights in mlx-lm's {quant.partition('-g')[0]} mixed recipe{floats}"
        if (mode := quant.partition("-")[0]) in MLX_MODES:
            bits, group_size = MLX_MODES[mode]
            return f"MLX {mode} weights ({bits}-bit floats, an 8-bit scale per {group_size}{floats})"
        fixed = re.fullmatch(r"(\d+)bit-g(\d+)(-.*)?", quant)
        if fixed is None:  # unquantized: fp16, bf16, fp32
            return f"MLX {dtype or 'float16'} weights"
        rounding = (", rounded by GPTQ against calibration inputs" if "-gptq" in quant else
                    ", each group's range clipped against calibration inputs" if "-clip" in quant else "")
        return f"MLX {fixed[1]}-bit weights (group size {fixed[2]}{rounding}{floats})"

    def usage(self, release: Release, folder: Path) -> list[str]:
        model_ref = release.repo_id or f"path/to/{release.name}"
        model_file = _config(folder).get("model_file")
        why, flag, trust = [], "", ""
        if model_file is not None:
            from siliconvert.convert.mlx_arch import FAITHFUL_FIXES

            why = [f"This folder runs its own model file, `{model_file}` (config.json's `model_file`): mlx-lm's "
                   f"`{_config(folder).get('model_type')}` computes another function for this model "
                   f"({FAITHFUL_FIXES.get(str(model_file), 'see the file')}). `{model_file}` is mlx-lm's own, "
                   "subclassed, with only that fixed. mlx-lm runs a folder's Python only when asked, so loading needs "
                   "`trust_remote_code=True` (`--trust-remote-code`); read the file first.", ""]
            flag, trust = " --trust-remote-code", ", trust_remote_code=True"
        return [
            *why,
            "```bash", "pip install mlx-lm", f'mlx_lm.generate --model {model_ref}{flag} --prompt "{CARD_PROMPT}"',
            "```", "", "```python", "from mlx_lm import generate, load", "",
            f'model, tokenizer = load("{model_ref}"{trust})',
            f'messages = [{{"role": "user", "content": "{CARD_PROMPT}"}}]',
            "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
            "print(generate(model, tokenizer, prompt=prompt, max_tokens=128))", "```",
        ]


def _model_file(targets: Sequence[MLXTarget]) -> MLXModelFile:
    """The model file a sweep's MLX folders run: siliconvert's where a recipe target asks for it (the family's
    mlx-lm file is then refused), else mlx-lm's."""
    return "faithful" if any(target.model_file == "faithful" for target in targets) else "mlx-lm"



def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ArtifactError("config.json is missing (mlx_lm.load reads the model from it)", folder)
    config = load_json(path.read_bytes(), "config.json", path)
    if not isinstance(config, dict):
        raise ArtifactError("config.json is not a JSON object", path)
    return config


# Tensors whose shape config.json's hidden_size fixes, in every family mlx-lm loads: (name suffix, the axis
# that is hidden_size, counted from the end; the input axis of a quantized weight is read from its scales)
HIDDEN_AXES = (
    ("embed_tokens.weight", -1), ("q_proj.weight", -1), ("k_proj.weight", -1), ("v_proj.weight", -1),
    ("gate_proj.weight", -1), ("up_proj.weight", -1), ("o_proj.weight", -2), ("down_proj.weight", -2),
    ("input_layernorm.weight", -1), ("post_attention_layernorm.weight", -1), ("model.norm.weight", -1),
    # LFM2's names: its MLP, short convolution, norms and attention output
    ("feed_forward.w1.weight", -1), ("feed_forward.w3.weight", -1), ("feed_forward.w2.weight", -2),
    ("conv.in_proj.weight", -1), ("conv.out_proj.weight", -2), ("operator_norm.weight", -1),
    ("ffn_norm.weight", -1), ("embedding_norm.weight", -1), ("self_attn.out_proj.weight", -2),
)


def _shard_shapes(shard: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a shard, its header checked by the safetensors library (extents, dtypes, tiling)
    without reading the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(shard, "numpy") as f:
            return {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as e:
        raise ArtifactError(f"damaged safetensors shard: {e}", shard) from None


def _check_shape(name: str, shape: list[int], shard: Path, shapes: dict[str, tuple[list[int], Path]],
                 config: dict[str, Any]) -> None:
    """A tensor's shape against config.json, as mlx_lm.load would find it when it loads the weights."""
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    quantization = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
    unpacked = list(shape)
    scales = shapes.get(name.removesuffix(".weight") + ".scales")
    own = quantization.get(name.removesuffix(".weight"))  # a module's own entry (a plan's, a narrower group's)
    group_size = (own if isinstance(own, dict) else quantization).get("group_size")
    if scales is not None and isinstance(group_size, int) and shape:
        unpacked[-1] = scales[0][-1] * group_size  # a quantized weight's input width
    if name.endswith("embed_tokens.weight") and isinstance(vocab, int) and unpacked[0] != vocab:
        raise ArtifactError(f"tensor {short(name)} has {unpacked[0]} rows, but config.json's vocab_size is "
                            f"{vocab}", shard)
    for suffix, axis in HIDDEN_AXES:
        if name.endswith(suffix) and isinstance(hidden, int) and len(unpacked) >= -axis and unpacked[axis] != hidden:
            raise ArtifactError(f"tensor {short(name)} has shape {shape}, which does not fit config.json's "
                                f"hidden_size {hidden}", shard)


def _safetensors_format(path: Path) -> str | None:
    """The "format" a safetensors writer recorded in its header metadata ("mlx", "pt", ...)."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > 100 * 1024 * 1024:
            return None
        try:
            return json.loads(f.read(header_len)).get("__metadata__", {}).get("format")
        except (ValueError, AttributeError):
            return None
