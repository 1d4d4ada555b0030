"""mlx's float32 products on Linux CPUs, through the optimized BLAS torch's wheel carries.

The `mlx[cpu]` wheel for Linux bundles the reference BLAS (netlib 3.10: `mlx_cpu.libs/libblas-*.so`), which
multiplies float32 at 4 to 5 GFLOP/s on this project's 2-core machines. Its `cblas_sgemm` hands the product to the
Fortran `sgemm_` through the dynamic linker, and torch's CPU wheel exports an optimized `sgemm_` (MKL's) from
libtorch_cpu.so: loaded into the global scope before mlx, it takes those calls, at 54 to 186 GFLOP/s there (a
2048 × 2048 product of 1024 rows; `tests/test_mlx_blas.py` checks the products agree with the reference's). A plain
`import torch` does not do it: torch loads that library into a scope of its own.

`siliconvert/__init__.py` arranges for `interpose` to run when mlx is first imported. Nothing changes but speed
and the order of a sum (float32 either way); `SILICONVERT_MLX_BLAS=bundled` keeps the wheel's own BLAS. On macOS mlx
uses Accelerate and on NVIDIA GPUs cuBLAS: nothing is done there.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

TORCH_BLAS = "torch's BLAS"
# what mlx's float32 products run through in this process: set by `interpose`, read by reports
blas: str = "mlx's own BLAS"


def interpose() -> str:
    """Load torch's BLAS into the global scope where it can take mlx's float32 products (before mlx is imported);
    returns and remembers what they run through."""
    global blas
    if "mlx.core" in sys.modules:
        return blas  # too late: the bundled BLAS is bound already
    library = _torch_blas()
    if library is not None:
        try:
            if hasattr(ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL), "sgemm_"):
                blas = TORCH_BLAS
        except OSError:
            pass  # a torch wheel without it: mlx keeps its own
    return blas


def _torch_blas() -> Path | None:
    """libtorch_cpu.so where mlx would otherwise multiply through the reference BLAS: Linux, not switched off."""
    if not sys.platform.startswith("linux") or os.environ.get("SILICONVERT_MLX_BLAS") == "bundled":
        return None
    spec = importlib.util.find_spec("torch")  # finds torch without importing it
    if spec is None or spec.origin is None:
        return None
    library = Path(spec.origin).parent / "lib" / "libtorch_cpu.so"
    return library if library.is_file() else None


class _BeforeMLX(importlib.abc.MetaPathFinder):
    """Runs `interpose` when mlx is first imported, wherever that happens (it must come first), then steps aside:
    finds nothing itself."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "mlx":
            sys.meta_path.remove(self)
            interpose()
        return None


def interpose_when_mlx_is_imported() -> None:
    if "mlx" not in sys.modules and not any(isinstance(finder, _BeforeMLX) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMLX())
