"""The one architecture registry: HF architecture name → family description.

Adding a family is a short module here (see llama.py) and one line below.
"""

from siliconvert.architectures.base import ConfigWarning, Family, ModelSpec, Registry, TensorRole
from siliconvert.architectures.llama import Llama
from siliconvert.architectures.mistral import Mistral
from siliconvert.architectures.qwen2 import Qwen2

registry = Registry()
for _family in (Llama, Mistral, Qwen2):
    registry.register(_family)

__all__ = ["ConfigWarning", "Family", "ModelSpec", "Registry", "TensorRole", "registry"]
