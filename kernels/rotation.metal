// The seeded FFT rotation of a few tokens as one kernel (bodies for mx.fast.metal_kernel); sections are split
// on the marker lines by mmt_mlx/fgs/runtime/kernels.py. R x = irfft(rfft(D x) * phase) is the circular
// convolution of D x with the real filter c = irfft(phase) (mmt_mlx/fgs/encoders/rotation.py), so for a
// decode token it is computed directly: n multiply-adds per output, one dispatch, where MLX's FFT path takes
// four (sign product, rfft, spectrum product, irfft) and prompts keep it (n log n).
// Forward: y[t, j] = sum_i c[(j - i) mod n] * s[i] * x[t, i].  Inverse (R^T y = D C^T y):
// y[t, j] = s[j] * sum_i c[(i - j) mod n] * x[t, i].
// Inputs: x (T, n) f32, signs (n) f32, filt (n) f32 (c), params int32 [T, n, inverse].  Output: y (T, n) f32.
// Only metal:: names, no simdgroup intrinsics: tests/metal_harness runs this exact text on the CPU.

// === kernel: rotate_direct ===
// Threadgroup (256, 1, 1); grid (256 * ceil(n / 256), 1, T): 256 outputs of one token per threadgroup, one
// per thread; the token's input (n <= 4096) sits in threadgroup memory, neighbouring threads read
// neighbouring filter taps.
const int T = params[0];
const int n = params[1];
const int inverse = params[2];
const int tid = int(thread_position_in_threadgroup.x);
const int j = int(threadgroup_position_in_grid.x) * 256 + tid;
const int t = int(threadgroup_position_in_grid.z);
threadgroup float u[4096];
for (int i = tid; i < n; i += 256) {
  const float xi = (t < T) ? x[t * n + i] : 0.0f;
  u[i] = inverse != 0 ? xi : signs[i] * xi;
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
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
