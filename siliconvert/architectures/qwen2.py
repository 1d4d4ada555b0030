"""Qwen2 / Qwen2.5: Llama's shape with biases on q, k and v (always on; no config key says so)."""

from typing import Any

from siliconvert.architectures.llama import Llama


class Qwen2(Llama):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    model_type = "qwen2"

    def _attention_biases(self, hf: Any) -> tuple[bool, bool]:
        return True, False
