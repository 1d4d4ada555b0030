"""siliconvert: one recipe, three formats (Core ML, MLX, GGUF), one honest validation table."""

import logging
import os
from importlib.metadata import PackageNotFoundError, version

from siliconvert import mlx_blas as _mlx_blas

# siliconvert draws its own progress bars; the libraries' own (coremltools' pass pipelines,
# transformers' weight loading) would interleave with them. tqdm reads this when it is imported.
os.environ.setdefault("TQDM_DISABLE", "1")
# On Linux coremltools warns at import that its prediction library is missing: conversion does
# not need it, and the MIL interpreter stands in for prediction (reported as emulated).
logging.getLogger("coremltools").setLevel(logging.ERROR)


def _not_a_coremltools_warning(record: logging.LogRecord) -> bool:
    """False for a coremltools warning sent to the root logger: some of its modules log there (`_getLogger()`
    without a name), e.g. optimize's "Invalid block_sizes" for each int4 block size a Core ML plan tries and
    the row does not divide, which the setting above cannot silence."""
    return record.levelno >= logging.ERROR or f"{os.sep}coremltools{os.sep}" not in record.pathname


logging.getLogger().addFilter(_not_a_coremltools_warning)


# mlx's float32 products on Linux CPUs go through torch's optimized BLAS: arranged before mlx is first imported
_mlx_blas.interpose_when_mlx_is_imported()

try:
    __version__ = version("siliconvert")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
