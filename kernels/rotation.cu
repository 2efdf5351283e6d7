// The seeded FFT rotation of a few tokens as one kernel (bodies for mx.fast.cuda_kernel). Same algorithm,
// inputs, grid and params as rotation.metal (read that file's notes); sections are split on the marker lines
// by mmt_mlx/fgs/runtime/kernels.py. MLX's CUDA wrapper launches ceil(grid / threadgroup) blocks of
// `threadgroup` threads.

// === kernel: rotate_direct ===
// Threadgroup (256, 1, 1); grid (256 * ceil(n / 256), 1, T): 256 outputs of one token per block, one
// per thread; the token's input (n <= 4096) sits in shared memory, neighbouring threads read
// neighbouring filter taps.
const int T = params[0];
const int n = params[1];
const int inverse = params[2];
const int tid = int(threadIdx.x);
const int j = int(blockIdx.x) * 256 + tid;
const int t = int(blockIdx.z);
__shared__ float u[4096];
for (int i = tid; i < n; i += 256) {
  const float xi = (t < T) ? x[t * n + i] : 0.0f;
  u[i] = inverse != 0 ? xi : signs[i] * xi;
}
__syncthreads();
if (j < n && t < T) {
  float acc = 0.0f;
  if (inverse == 0) {  // c[j - i] for i <= j, then c[n + j - i]
    for (int i = 0; i <= j; ++i) {
      acc += filt[j - i] * u[i];
    }
    for (int i = j + 1; i < n; ++i) {
      acc += filt[n + j - i] * u[i];
    }
    y[t * n + j] = acc;
  } else {  // c[i - j] for i >= j, then c[n - j + i]
    for (int i = j; i < n; ++i) {
      acc += filt[i - j] * u[i];
    }
    for (int i = 0; i < j; ++i) {
      acc += filt[n - j + i] * u[i];
    }
    y[t * n + j] = signs[j] * acc;
  }
}
