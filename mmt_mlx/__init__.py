"""mmt_mlx: an MLX runtime for language models stored as FGS codes."""

from mmt_mlx.blas import preload_optimized_blas

preload_optimized_blas()  # must run before anything imports mlx.core

__version__ = "0.1.0"
