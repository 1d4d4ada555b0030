"""Llama (1, 2, 3.x): the reference shape every other family here departs from."""

from siliconvert.architectures.base import Family


class Llama(Family):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    model_type = "llama"
