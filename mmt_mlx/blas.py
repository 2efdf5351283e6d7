"""Use an optimized BLAS for MLX on Linux CPU.

MLX's Linux CPU wheel links the reference netlib BLAS (f32 GEMM at 2-4 GFLOP/s). Loading an OpenBLAS with
RTLD_GLOBAL *before* ``mlx.core`` is imported makes MLX resolve ``cblas_sgemm`` & co. to it (90-160 GFLOP/s
measured). Nothing happens when no OpenBLAS is found, on macOS (Accelerate), or with ``MMT_BLAS=0``.
Set ``MMT_BLAS=/path/to/libopenblas.so`` to pick a library explicitly.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


def preload_optimized_blas() -> str | None:
    """Load an OpenBLAS globally if one is available; return its path (or None)."""
    global loaded
    if loaded is not None or not sys.platform.startswith("linux"):
        return loaded
    choice = os.environ.get("MMT_BLAS", "")
    if choice == "0":
        return None
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return None
    for path in ([choice] if choice else []) + list(_CANDIDATES):
        if path and os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    return loaded
