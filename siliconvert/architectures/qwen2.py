"""Qwen2 / Qwen2.5: Llama's shape with biases on q, k and v (always on; no config key says so)."""

from typing import Any

from siliconvert.architectures.llama import Llama


class Qwen2(Llama):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)

    def _attention_biases(self, config: dict[str, Any]) -> tuple[bool, bool]:
        return True, False

    def _sliding_window(self, config: dict[str, Any]) -> int | None:
        # Qwen2 configs carry a sliding_window that only applies when use_sliding_window is true.
        return super()._sliding_window(config) if config.get("use_sliding_window") else None
