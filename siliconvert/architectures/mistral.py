"""Mistral: Llama's tensors and maths, plus an optional sliding attention window."""

from siliconvert.architectures.llama import Llama


class Mistral(Llama):
    name = "mistral"
    hf_architectures = ("MistralForCausalLM",)
