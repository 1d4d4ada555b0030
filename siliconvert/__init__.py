"""siliconvert: one recipe, three formats (Core ML, MLX, GGUF), one honest validation table."""

import logging
import os
from importlib.metadata import PackageNotFoundError, version

# siliconvert draws its own progress bars; the libraries' own (coremltools' pass pipelines,
# transformers' weight loading) would interleave with them. tqdm reads this when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")
# On Linux coremltools warns at import that its prediction library is missing: conversion does
# not need it, and the MIL interpreter stands in for prediction (reported as emulated).
logging.getLogger("coremltools").setLevel(logging.ERROR)

try:
    __version__ = version("siliconvert")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
