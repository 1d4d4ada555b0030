"""The top floor: the command line and the jobs it runs (recipe, sweep, validate, release, push, inspect).
Importing it registers the formats (formats/), which everything here reaches through siliconvert/format.py."""

import siliconvert.formats  # noqa: F401 - registers MLX, GGUF and Core ML
