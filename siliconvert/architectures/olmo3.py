"""OLMo 3: OLMo 2 (norms after attention and MLP only, q/k RMSNorm over the whole projection) with sliding-window
layers (`layer_types`: three sliding, then one full, by transformers' default) and a rope per layer type (the full
layers' may scale, YaRN in the 7B and 32B; the sliding layers' never does)."""

from siliconvert.architectures.olmo2 import Olmo2


class Olmo3(Olmo2):
    name = "olmo3"
    hf_architectures = ("Olmo3ForCausalLM",)
    model_type = "olmo3"
