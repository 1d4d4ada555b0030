"""The formats siliconvert writes, one entry each (siliconvert/format.py says what an entry is). Importing this
package registers them, in the order reports and sweeps list them."""

from siliconvert.format import register
from siliconvert.formats.coreml import CoreML
from siliconvert.formats.gguf import GGUF
from siliconvert.formats.mlx import MLX

for _entry in (MLX(), GGUF(), CoreML()):
    register(_entry)
