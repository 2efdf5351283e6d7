// Gaussian-row level, fused weight synthesis + product (bodies for mx.fast.metal_kernel).
// Each section below is one kernel body; mmt_mlx/fgs/runtime/kernels.py splits the file on the marker lines.
// Math (mmt_mlx/fgs/codes.py): Wp[i, j] = sum_k amp[i,k] * exp(-(j - mu[i,k])^2 / (2 sigma[sidx[i,k]]^2)),
// y[t, i] = sum_j Wp[i, j] * x[t, perm[j]].  gcoef[s] = -1 / (2 sigma_s^2).
// Inputs: x (T, cols) f32, perm (cols) int32, amp (rows, K) f32, mu (rows, K) int32, sidx (rows, K) uint8,
//         gcoef (S) f32, params int32 [T, rows, cols, K].  Output: y (T, rows) f32.
// Only metal:: names, no simdgroup intrinsics: tests/metal_harness runs this exact text on the CPU.

// === kernel: gaussian_matmul_decode ===
// Template: TC (columns per chunk).  Threadgroup (256, 1, 1); grid (256, 8 * ceil(rows / 8), T).
// 8 rows per threadgroup, 32 lanes per row. A decode token has no reuse of a weight, so each weight
// is regenerated in registers; x's chunk and the rows' bumps sit in threadgroup memory.
const int T = params[0];
const int rows = params[1];
const int cols = params[2];
const int K = params[3];
const int tid = int(thread_position_in_threadgroup.x);
const int lane = tid % 32;
const int rloc = tid / 32;
const int row = int(threadgroup_position_in_grid.y) * 8 + rloc;
const int t = int(threadgroup_position_in_grid.z);
threadgroup float xs[TC];
threadgroup float b_mu[256];
threadgroup float b_c[256];
threadgroup float b_a[256];
threadgroup float red[256];
float acc = 0.0f;
for (int c0 = 0; c0 < cols; c0 += TC) {
  const int n = metal::min(TC, cols - c0);
  for (int j = tid; j < n; j += 256) {
    xs[j] = (t < T) ? x[t * cols + perm[c0 + j]] : 0.0f;
  }
  for (int k0 = 0; k0 < K; k0 += 32) {
    // one (row, bump) pair per thread: 8 rows x 32 bumps
    const int kk = k0 + lane;
    if (row < rows && kk < K) {
      b_mu[tid] = float(mu[row * K + kk]);
      b_c[tid] = gcoef[sidx[row * K + kk]];
      b_a[tid] = amp[row * K + kk];
    } else {
      b_mu[tid] = 0.0f;
      b_c[tid] = -1.0f;
      b_a[tid] = 0.0f;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    const int kn = metal::min(32, K - k0);
    for (int j = lane; j < n; j += 32) {
      const float fj = float(c0 + j);
      float w = 0.0f;
      for (int k = 0; k < kn; ++k) {
        const float d = fj - b_mu[rloc * 32 + k];
        const float e = d * d * b_c[rloc * 32 + k];
        if (e > -87.0f) {  // below that exp underflows f32: skip the far bumps cheaply
          w += b_a[rloc * 32 + k] * metal::exp(e);
        }
      }
      acc += w * xs[j];
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
}
red[tid] = acc;
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
for (int s = 16; s > 0; s >>= 1) {
  if (lane < s) {
    red[tid] += red[tid + s];
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
}
if (lane == 0 && row < rows && t < T) {
  y[t * rows + row] = red[tid];
}

// === kernel: gaussian_matmul_prefill ===
// Threadgroup (256, 1, 1); grid (256, ceil(rows / 32), ceil(T / 32)).
// A 32-row x 32-column weight tile is regenerated into threadgroup memory once and used by 32 tokens;
// each thread owns 2 rows x 2 tokens of the 32 x 32 output tile.
const int T = params[0];
const int rows = params[1];
const int cols = params[2];
const int K = params[3];
const int tid = int(thread_position_in_threadgroup.x);
const int r0 = int(threadgroup_position_in_grid.y) * 32;
const int t0 = int(threadgroup_position_in_grid.z) * 32;
const int tr = tid / 16;  // output rows 2*tr, 2*tr+1 of the tile
const int tt = tid % 16;  // output tokens 2*tt, 2*tt+1 of the tile
threadgroup float wt[32 * 33];  // weight tile, padded rows
threadgroup float xt[32 * 33];  // x tile (tokens x columns), permuted columns
threadgroup float b_mu[256];
threadgroup float b_c[256];
threadgroup float b_a[256];
float acc00 = 0.0f, acc01 = 0.0f, acc10 = 0.0f, acc11 = 0.0f;
for (int c0 = 0; c0 < cols; c0 += 32) {
  const int n = metal::min(32, cols - c0);
  for (int e = tid; e < 32 * 32; e += 256) {
    const int tk = e / 32, j = e % 32;
    xt[tk * 33 + j] = (t0 + tk < T && j < n) ? x[(t0 + tk) * cols + perm[c0 + j]] : 0.0f;
  }
  float w0 = 0.0f, w1 = 0.0f, w2 = 0.0f, w3 = 0.0f;  // tile entries tid + 256*q: row e/32, col e%32
  for (int k0 = 0; k0 < K; k0 += 8) {
    // 32 rows x 8 bumps, one per thread
    const int br = tid / 8, kk = k0 + tid % 8;
    if (r0 + br < rows && kk < K) {
      b_mu[tid] = float(mu[(r0 + br) * K + kk]);
      b_c[tid] = gcoef[sidx[(r0 + br) * K + kk]];
      b_a[tid] = amp[(r0 + br) * K + kk];
    } else {
      b_mu[tid] = 0.0f;
      b_c[tid] = -1.0f;
      b_a[tid] = 0.0f;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    const int kn = metal::min(8, K - k0);
    for (int q = 0; q < 4; ++q) {
      const int e = tid + 256 * q;
      const int wr = e / 32;
      const float fj = float(c0 + e % 32);
      float w = 0.0f;
      for (int k = 0; k < kn; ++k) {
        const float d = fj - b_mu[wr * 8 + k];
        const float ex = d * d * b_c[wr * 8 + k];
        if (ex > -87.0f) {
          w += b_a[wr * 8 + k] * metal::exp(ex);
        }
      }
      if (q == 0) w0 += w;
      else if (q == 1) w1 += w;
      else if (q == 2) w2 += w;
      else w3 += w;
    }
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  }
  wt[((tid) / 32) * 33 + (tid) % 32] = w0;
  wt[((tid + 256) / 32) * 33 + (tid + 256) % 32] = w1;
  wt[((tid + 512) / 32) * 33 + (tid + 512) % 32] = w2;
  wt[((tid + 768) / 32) * 33 + (tid + 768) % 32] = w3;
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  for (int j = 0; j < n; ++j) {
    const float wa = wt[(2 * tr) * 33 + j], wb = wt[(2 * tr + 1) * 33 + j];
    const float xa = xt[(2 * tt) * 33 + j], xb = xt[(2 * tt + 1) * 33 + j];
    acc00 += wa * xa;
    acc01 += wa * xb;
    acc10 += wb * xa;
    acc11 += wb * xb;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
}
const int ra = r0 + 2 * tr, ta = t0 + 2 * tt;
if (ra < rows && ta < T) y[ta * rows + ra] = acc00;
if (ra < rows && ta + 1 < T) y[(ta + 1) * rows + ra] = acc01;
if (ra + 1 < rows && ta < T) y[ta * rows + ra + 1] = acc10;
if (ra + 1 < rows && ta + 1 < T) y[(ta + 1) * rows + ra + 1] = acc11;
