"""Metal and CUDA kernel sources (installed as mmt_mlx.kernels)."""
