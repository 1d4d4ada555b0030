"""MLX: a folder mlx_lm.load opens unchanged (mlx-lm's layout and config.json); one release folder per artifact."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from siliconvert.artifacts import CARD_PROMPT, Artifact, Release, Writer
from siliconvert.calibration import Calibrations
from siliconvert.checkpoint import Checkpoint
from siliconvert.format import Format
from siliconvert.recipe import MLXTarget, QuantPlan

FIXED_BITS = (3, 4, 6, "mixed_3_6", "mixed_4_6")  # the anchors' recipes a sweep builds, at mlx-lm's group size 64


class MLX(Format):
    name = "mlx"
    target = MLXTarget
    runner = "siliconvert.validate.runners.mlx:MLXRunner"
    library = "mlx"
    tags = ("mlx",)
    looks_like = "an MLX folder"
    fixed_quants = tuple(MLXTarget(format="mlx", bits=bits, group_size=64).quant for bits in FIXED_BITS)
    anchor = "4bit-g64"

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
        quantization = json.loads((path / "config.json").read_text()).get("quantization")
        if quantization:
            return Artifact(self.name, f"{quantization['bits']}bit-g{quantization['group_size']}", path)
        return Artifact(self.name, "fp16", path)

    def describe(self, artifact: Artifact) -> dict[str, Any]:
        config = json.loads((artifact.path / "config.json").read_text())
        return {"quantization": config.get("quantization"), "model_type": config.get("model_type")}

    def sweep_fixed(self, targets: Sequence[MLXTarget], quants: Sequence[str]) -> list[MLXTarget]:
        fixed = [MLXTarget(format=self.name, bits=bits, group_size=64) for bits in FIXED_BITS]
        return [target for target in fixed if target.quant in quants]

    def sweep_planned(self, targets: Sequence[MLXTarget], plan: QuantPlan) -> MLXTarget:
        return MLXTarget(format=self.name, bits="auto", plan=plan)

    def aims_at(self, quant: str) -> bool:
        return not quant.startswith("mixed_")  # the mixed recipes sit between the widths

    def release_name(self, model: str, quant: str) -> str:
        # MLX quants read "4bit-g64", "8bit-g32", "fp16"; Hub names leave out mlx-lm's default group size.
        return f"{model}-{quant.removesuffix('-g64')}"

    def summary(self, release: Release) -> str:
        entry = release.shipped[0]
        quant = entry["quant"]
        if plan := entry.get("plan"):
            floats = f", {plan['float_type']} elsewhere" if plan.get("float_type") else ""
            return f"MLX weights quantized per module by plan ({plan['bits_per_weight']:.2f} bits per weight{floats})"
        if quant.startswith("mixed_"):
            return f"MLX weights in mlx-lm's {quant} mixed recipe"
        bits, _, group = quant.partition("bit-g")
        return "MLX float16 weights" if quant == "fp16" else f"MLX {bits}-bit weights (group size {group})"

    def usage(self, release: Release, folder: Path) -> list[str]:
        model_ref = release.repo_id or f"path/to/{release.name}"
        return [
            "```bash", "pip install mlx-lm", f'mlx_lm.generate --model {model_ref} --prompt "{CARD_PROMPT}"', "```",
            "", "```python", "from mlx_lm import generate, load", "", f'model, tokenizer = load("{model_ref}")',
            f'messages = [{{"role": "user", "content": "{CARD_PROMPT}"}}]',
            "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
            "print(generate(model, tokenizer, prompt=prompt, max_tokens=128))", "```",
        ]


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
