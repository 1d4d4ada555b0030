"""siliconvert: one recipe, three formats (Core ML, MLX, GGUF), one honest validation table."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("siliconvert")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
