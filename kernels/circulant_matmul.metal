// Block-circulant level (body for mx.fast.metal_kernel): spectrum products summed over input blocks,
// then a direct inverse real DFT of each output block (block sizes are small, so no FFT inside).
// The forward rfft of x's blocks is done by mx.fft.rfft before the call (MLX runs it on the GPU).
// Math (mmt_mlx/fgs/codes.py): Y_I(f) = sum_J S_IJ(f) X_J(f);  y_I = irfft(Y_I, n=BLOCK), cropped to rows.
// Inputs: xr, xi (T, Cb, F) f32 (real/imag of rfft(x blocks)), sr, si (Rb, Cb, F) f32 (stored spectra),
//         params int32 [T, rows, Rb, Cb].  Output: y (T, rows) f32.
// Template: BLOCK (b), IG (block-rows per threadgroup), TT (tokens per threadgroup: 1 for decode, more
// for prefill, where each spectrum value read is reused TT times).
// Threadgroup (BLOCK, IG, 1); grid (BLOCK, IG * ceil(Rb / IG), ceil(T / TT)).
// Thread (m, i): in phase 1 frequency m (m < F) of block-row I; in phase 2 output row m of block-row I.

// === kernel: circulant_matmul ===
constexpr int F = BLOCK / 2 + 1;
const int T = params[0];
const int rows = params[1];
const int Rb = params[2];
const int Cb = params[3];
const int m = int(thread_position_in_threadgroup.x);
const int il = int(thread_position_in_threadgroup.y);
const int I = int(threadgroup_position_in_grid.y) * IG + il;
const int t0 = int(threadgroup_position_in_grid.z) * TT;
threadgroup float ys_r[IG * TT * F];
threadgroup float ys_i[IG * TT * F];
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
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
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
          v += 2.0f * (ys_r[base + f] * metal::cos(ang) - ys_i[base + f] * metal::sin(ang));
        }
      }
      y[(t0 + q) * rows + row] = v / float(BLOCK);
    }
  }
}
