"""Use an optimized BLAS for MLX on Linux CPU.

MLX's Linux CPU wheel links the reference netlib BLAS (f32 GEMM at 2-4 GFLOP/s). Loading an OpenBLAS with
RTLD_GLOBAL *before* ``mlx.core`` is imported makes MLX resolve ``cblas_sgemm`` & co. to it (90-160 GFLOP/s
measured). First choice: pip's ``scipy-openblas32`` (a dependency), whose symbols carry a ``scipy_`` prefix,
through the small shim built with the native kernels (kernels/cpu/blas_shim.c, ``libmmt_blas_shim.so``);
then a system OpenBLAS. Nothing happens when neither is found, on macOS (Accelerate), or with ``MMT_BLAS=0``.
Set ``MMT_BLAS=/path/to/libopenblas.so`` to pick a library explicitly, ``MMT_BLAS=system`` to skip pip's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

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


def _pip_openblas() -> str | None:
    """Load scipy-openblas32 and the cblas shim globally; return a description, or None if either is absent."""
    shim = Path(__file__).resolve().parent / "libmmt_blas_shim.so"
    spec = importlib.util.find_spec("scipy_openblas32")  # located without importing it
    if not shim.exists() or spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib" / "libscipy_openblas.so"
    if not lib.exists():
        return None
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return f"{lib} (scipy-openblas32, via {shim.name})"


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
    if choice in ("", "pip"):
        loaded = _pip_openblas()
        if loaded is not None:
            return loaded
    for path in ([choice] if choice not in ("", "pip", "system") else []) + list(_CANDIDATES):
        if path and os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    return loaded
