"""Mistral: Llama's tensors and maths; its sliding window, when set, applies to every layer."""

from siliconvert.architectures.llama import Llama


class Mistral(Llama):
    name = "mistral"
    hf_architectures = ("MistralForCausalLM",)
    model_type = "mistral"
    all_layers_slide = True
