"""The FGS runtime (MLX): layers that run FGS codes without rebuilding dense weights, their matmul
operations, and the Metal/CUDA kernels that replace those operations on a GPU."""
