// Block-circulant level (body for mx.fast.cuda_kernel): spectrum products summed over input blocks, then
// a direct inverse real DFT per output block. Same inputs, grid and template ints as
// circulant_matmul.metal (read that file's notes); the forward rfft of x is mx.fft.rfft before the call.

// === kernel: circulant_matmul ===
constexpr int F = BLOCK / 2 + 1;
const int T = params[0];
const int rows = params[1];
const int Rb = params[2];
const int Cb = params[3];
const int m = int(threadIdx.x);
const int il = int(threadIdx.y);
const int I = int(blockIdx.y) * IG + il;
const int t0 = int(blockIdx.z) * TT;
__shared__ float ys_r[IG * TT * F];
__shared__ float ys_i[IG * TT * F];
if (m < F) {
  float ar[TT];
  float ai[TT];
  for (int q = 0; q < TT; ++q) {
    ar[q] = 0.0f;
    ai[q] = 0.0f;
  }
  if (I < Rb) {
    for (int J = 0; J < Cb; ++J) {
      const float s_r = sr[(I * Cb + J) * F + m];
      const float s_i = si[(I * Cb + J) * F + m];
      for (int q = 0; q < TT; ++q) {
        if (t0 + q < T) {
          const float x_r = xr[((t0 + q) * Cb + J) * F + m];
          const float x_i = xi[((t0 + q) * Cb + J) * F + m];
          ar[q] += s_r * x_r - s_i * x_i;
          ai[q] += s_r * x_i + s_i * x_r;
        }
      }
    }
  }
  for (int q = 0; q < TT; ++q) {
    ys_r[(il * TT + q) * F + m] = ar[q];
    ys_i[(il * TT + q) * F + m] = ai[q];
  }
}
__syncthreads();
const int row = I * BLOCK + m;
if (I < Rb && row < rows) {
  const float step = 6.283185307179586f / float(BLOCK);
  for (int q = 0; q < TT; ++q) {
    if (t0 + q < T) {
      const int base = (il * TT + q) * F;
      float v = ys_r[base];  // DC term: its imaginary part is ignored, as numpy's irfft does
      for (int f = 1; f < F; ++f) {
        if ((BLOCK % 2) == 0 && f == F - 1) {
          v += ((m & 1) ? -1.0f : 1.0f) * ys_r[base + f];  // Nyquist term, counted once
        } else {
          const float ang = step * float((f * m) % BLOCK);
          v += 2.0f * (ys_r[base + f] * cosf(ang) - ys_i[base + f] * sinf(ang));
        }
      }
      y[(t0 + q) * rows + row] = v / float(BLOCK);
    }
  }
}
