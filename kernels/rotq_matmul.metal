// Rotated Gaussian codes ("rotq" level): weights synthesized from codes + product (bodies for
// mx.fast.metal_kernel). Each section below is one kernel body; mmt_mlx/fgs/runtime/kernels.py splits the
// file on the marker lines. The input x arrives already rotated (x R^T, MLX's own FFT on the GPU).
// Math (mmt_mlx/fgs/codes.py RotQCode): row r's codes q[r, j] are a little-endian bit stream of `bits`-bit
// indices (cols * bits / 32 uint32 words per row, the layout quant.pack_bits writes and MLX's affine
// packing reads); W[r, j] = codebook[i] * scales[r, j / group] with i = q[r, j] for scalar codes and, for
// trellis codes, i = (s << bits) | q[r, j] where s = 2 * low bit of q[r - 2, j] + low bit of q[r - 1, j]
// (zero above row 0). y[t, r] = sum_j W[r, j] * x[t, j].
// Inputs: x (T, cols) f32, wq (rows, words) uint32, scales (rows, cols / group) f32, codebook (ncb) f32,
//         params int32 [T, rows, cols, bits, group, trellis, words, ncb].  Output: y (T, rows) f32.
// Only metal:: names, no simdgroup intrinsics: tests/metal_harness runs this exact text on the CPU.

// === kernel: rotq_matmul_decode ===
// Template: TC (columns per chunk).  Threadgroup (256, 1, 1); grid (256, 8 * ceil(rows / 8), T).
// 8 rows per threadgroup, 32 lanes per row; neighbouring lanes read neighbouring codes (the same words).
// A decode token has no reuse of a weight, so each weight is synthesized in a register; the codebook
// (at most 4 << 8 levels) and x's chunk sit in threadgroup memory.
const int T = params[0];
const int rows = params[1];
const int cols = params[2];
const int bits = params[3];
const int group = params[4];
const int trellis = params[5];
const int words = params[6];
const int ncb = params[7];
const int ng = cols / group;
const uint mask = (1u << uint(bits)) - 1u;
const int tid = int(thread_position_in_threadgroup.x);
const int lane = tid % 32;
const int rloc = tid / 32;
const int row = int(threadgroup_position_in_grid.y) * 8 + rloc;
const int t = int(threadgroup_position_in_grid.z);
threadgroup float xs[TC];
threadgroup float cbs[1024];
threadgroup float red[256];
for (int i = tid; i < ncb; i += 256) {
  cbs[i] = codebook[i];
}
float acc = 0.0f;
for (int c0 = 0; c0 < cols; c0 += TC) {
  const int n = metal::min(TC, cols - c0);
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // the last chunk is read; codebook in
  for (int j = tid; j < n; j += 256) {
    xs[j] = (t < T) ? x[t * cols + c0 + j] : 0.0f;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (row < rows) {
    for (int j = lane; j < n; j += 32) {
      const int c = c0 + j;
      const uint bit = uint(c) * uint(bits);
      const int w = row * words + int(bit >> 5u);
      const uint sh = bit & 31u;
      uint q = wq[w] >> sh;
      if (sh + uint(bits) > 32u) {
        q |= wq[w + 1] << (32u - sh);  // the code straddles two words (3, 5, 6, 7 bits)
      }
      q &= mask;
      if (trellis != 0) {  // a code's low bit never straddles: it sits in word w of its row
        const uint s2 = row >= 2 ? (wq[w - 2 * words] >> sh) & 1u : 0u;
        const uint s1 = row >= 1 ? (wq[w - words] >> sh) & 1u : 0u;
        q |= ((s2 << 1u) | s1) << uint(bits);
      }
      acc += cbs[q] * scales[row * ng + c / group] * xs[j];
    }
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

// === kernel: rotq_matmul_prefill ===
// Threadgroup (256, 1, 1); grid (256, ceil(rows / 32), ceil(T / 32)).
// A 32-row x 32-column weight tile is synthesized into threadgroup memory once (4 entries per thread) and
// used by 32 tokens; each thread owns 2 rows x 2 tokens of the 32 x 32 output tile.
const int T = params[0];
const int rows = params[1];
const int cols = params[2];
const int bits = params[3];
const int group = params[4];
const int trellis = params[5];
const int words = params[6];
const int ncb = params[7];
const int ng = cols / group;
const uint mask = (1u << uint(bits)) - 1u;
const int tid = int(thread_position_in_threadgroup.x);
const int r0 = int(threadgroup_position_in_grid.y) * 32;
const int t0 = int(threadgroup_position_in_grid.z) * 32;
const int tr = tid / 16;  // output rows 2*tr, 2*tr+1 of the tile
const int tt = tid % 16;  // output tokens 2*tt, 2*tt+1 of the tile
threadgroup float wt[32 * 33];  // weight tile, padded rows
threadgroup float xt[32 * 33];  // x tile (tokens x columns)
threadgroup float cbs[1024];
for (int i = tid; i < ncb; i += 256) {
  cbs[i] = codebook[i];
}
float acc00 = 0.0f, acc01 = 0.0f, acc10 = 0.0f, acc11 = 0.0f;
for (int c0 = 0; c0 < cols; c0 += 32) {
  const int n = metal::min(32, cols - c0);
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);  // the last tiles are read; codebook in
  for (int e = tid; e < 32 * 32; e += 256) {
    const int tk = e / 32, j = e % 32;
    xt[tk * 33 + j] = (t0 + tk < T && j < n) ? x[(t0 + tk) * cols + c0 + j] : 0.0f;
    const int row = r0 + tk;  // the weight entry of the same index: tile row tk, column j
    float wv = 0.0f;
    if (row < rows && j < n) {
      const int c = c0 + j;
      const uint bit = uint(c) * uint(bits);
      const int w = row * words + int(bit >> 5u);
      const uint sh = bit & 31u;
      uint q = wq[w] >> sh;
      if (sh + uint(bits) > 32u) {
        q |= wq[w + 1] << (32u - sh);
      }
      q &= mask;
      if (trellis != 0) {
        const uint s2 = row >= 2 ? (wq[w - 2 * words] >> sh) & 1u : 0u;
        const uint s1 = row >= 1 ? (wq[w - words] >> sh) & 1u : 0u;
        q |= ((s2 << 1u) | s1) << uint(bits);
      }
      wv = cbs[q] * scales[row * ng + c / group];
    }
    wt[tk * 33 + j] = wv;
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  for (int j = 0; j < n; ++j) {
    const float wa = wt[(2 * tr) * 33 + j], wb = wt[(2 * tr + 1) * 33 + j];
    const float xa = xt[(2 * tt) * 33 + j], xb = xt[(2 * tt + 1) * 33 + j];
    acc00 += wa * xa;
    acc01 += wa * xb;
    acc10 += wb * xa;
    acc11 += wb * xb;
  }
}
const int ra = r0 + 2 * tr, ta = t0 + 2 * tt;
if (ra < rows && ta < T) y[ta * rows + ra] = acc00;
if (ra < rows && ta + 1 < T) y[(ta + 1) * rows + ra] = acc01;
if (ra + 1 < rows && ta < T) y[ta * rows + ra + 1] = acc10;
if (ra + 1 < rows && ta + 1 < T) y[(ta + 1) * rows + ra + 1] = acc11;
