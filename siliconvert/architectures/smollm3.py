"""SmolLM3: Llama with no positional encoding in the layers `no_rope_layers` marks 0 (NoPE)."""

from typing import Any

from siliconvert.architectures.base import Family


class SmolLM3(Family):
    name = "smollm3"
    hf_architectures = ("SmolLM3ForCausalLM",)
    model_type = "smollm3"
    understood_keys = Family.understood_keys | {"no_rope_layers", "no_rope_layer_interval"}

    def _uses_rope(self, hf: Any) -> list[bool]:
        return [bool(flag) for flag in hf.no_rope_layers]
