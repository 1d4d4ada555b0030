"""The one architecture registry: HF architecture name → family description.

Adding a family is a short module here (see qwen3.py: a mapping from its config onto traits) and one line below.
"""

from siliconvert.architectures.base import (
    LLAMA_TRAITS,
    ConfigWarning,
    Experts,
    Family,
    Layer,
    ModelSpec,
    Registry,
    Rope,
    ShortConv,
    TensorRole,
)
from siliconvert.architectures.gemma2 import Gemma2
from siliconvert.architectures.gemma3 import Gemma3, Gemma3Multimodal
from siliconvert.architectures.gemma4 import Gemma4, Gemma4Multimodal
from siliconvert.architectures.gpt_oss import GptOss
from siliconvert.architectures.granite import Granite
from siliconvert.architectures.granite_hybrid import FalconH1, GraniteHybrid, NemotronH
from siliconvert.architectures.lfm2 import Lfm2
from siliconvert.architectures.llama import Llama
from siliconvert.architectures.ministral3 import Ministral3, Mistral3Multimodal
from siliconvert.architectures.mistral import Mistral
from siliconvert.architectures.mixtral import Mixtral
from siliconvert.architectures.olmo2 import Olmo2
from siliconvert.architectures.olmo3 import Olmo3
from siliconvert.architectures.olmoe import Olmoe
from siliconvert.architectures.phi3 import Phi3
from siliconvert.architectures.qwen2 import Qwen2
from siliconvert.architectures.qwen2_moe import Qwen2Moe
from siliconvert.architectures.qwen3 import Qwen3
from siliconvert.architectures.qwen3_5 import Qwen3_5, Qwen3_5Moe, Qwen3_5MoeMultimodal, Qwen3_5Multimodal, Qwen3Next
from siliconvert.architectures.qwen3_moe import Qwen3Moe
from siliconvert.architectures.smollm3 import SmolLM3

registry = Registry()
for _family in (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, Gemma3Multimodal, Olmo2, Granite, Phi3, SmolLM3,
                Qwen3Moe, Mixtral, Qwen2Moe, Olmoe, Olmo3, Lfm2, Qwen3_5,
                Qwen3_5Multimodal, Qwen3_5Moe, Qwen3_5MoeMultimodal, Qwen3Next,
                GraniteHybrid, NemotronH, FalconH1, Ministral3, Mistral3Multimodal, Gemma4, Gemma4Multimodal,
                GptOss):
    registry.register(_family)

__all__ = ["LLAMA_TRAITS", "ConfigWarning", "Experts", "Family", "Layer", "ModelSpec", "Registry", "Rope", "ShortConv",
           "TensorRole", "registry"]
