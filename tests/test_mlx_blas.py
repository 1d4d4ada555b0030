"""siliconvert/mlx_blas.py: mlx's float32 products through torch's BLAS on Linux, the same products."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np

from siliconvert import mlx_blas


def test_torch_blas_takes_mlx_float32_products_and_agrees_with_the_reference():
    assert mlx_blas.blas == mlx_blas.TORCH_BLAS  # siliconvert was imported before mlx, as every entry point does
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 517)).astype(np.float32), rng.standard_normal((517, 211)).astype(np.float32)
    product = np.array(mx.array(a) @ mx.array(b))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(product - exact).max() < 1e-4 * np.abs(exact).max()


def blas_in_a_fresh_process(code: str, **env: str) -> str:
    run = subprocess.run([sys.executable, "-c", code + "\nprint(mlx_blas.blas)"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return run.stdout.strip()


def test_it_is_switched_off_by_name_and_too_late_once_mlx_is_loaded():
    imported_first = "import siliconvert, mlx.core\nfrom siliconvert import mlx_blas"
    assert blas_in_a_fresh_process(imported_first) == mlx_blas.TORCH_BLAS
    assert blas_in_a_fresh_process(imported_first, SILICONVERT_MLX_BLAS="bundled") == "mlx's own BLAS"
    # mlx bound its bundled BLAS already: interposing now would only claim a speed it does not have
    late = "import mlx.core\nfrom siliconvert import mlx_blas"
    assert blas_in_a_fresh_process(late + "\nmlx_blas.interpose()") == "mlx's own BLAS"
