// Rotated Gaussian codes ("rotq" level): weights synthesized from codes + product (bodies for
// mx.fast.cuda_kernel). Same algorithm, inputs, grids and template ints as rotq_matmul.metal (read that
// file's notes); sections are split on the marker lines by mmt_mlx/fgs/runtime/kernels.py.
// MLX's CUDA wrapper turns template ints into `constexpr int` lines at the top of the body and
// launches ceil(grid / threadgroup) blocks of `threadgroup` threads.

// === kernel: rotq_matmul_decode ===
// Template: TC (columns per chunk).  Threadgroup (256, 1, 1); grid (256, 8 * ceil(rows / 8), T).
// 8 rows per block, 32 lanes per row; neighbouring lanes read neighbouring codes (the same words).
// A decode token has no reuse of a weight, so each weight is synthesized in a register; the codebook
// (at most 4 << 8 levels) and x's chunk sit in shared memory.
const int T = params[0];
const int rows = params[1];
const int cols = params[2];
const int bits = params[3];
const int group = params[4];
const int trellis = params[5];
const int words = params[6];
const int ncb = params[7];
const int ng = cols / group;
const unsigned mask = (1u << (unsigned)(bits)) - 1u;
const int tid = int(threadIdx.x);
const int lane = tid % 32;
const int rloc = tid / 32;
const int row = int(blockIdx.y) * 8 + rloc;
const int t = int(blockIdx.z);
__shared__ float xs[TC];
__shared__ float cbs[1024];
__shared__ float red[256];
for (int i = tid; i < ncb; i += 256) {
  cbs[i] = codebook[i];
}
float acc = 0.0f;
for (int c0 = 0; c0 < cols; c0 += TC) {
  const int n = min(TC, cols - c0);
  __syncthreads();  // the last chunk is read; codebook in
  for (int j = tid; j < n; j += 256) {
    xs[j] = (t < T) ? x[t * cols + c0 + j] : 0.0f;
  }
  __syncthreads();
  if (row < rows) {
    for (int j = lane; j < n; j += 32) {
      const int c = c0 + j;
      const unsigned bit = (unsigned)(c) * (unsigned)(bits);
      const int w = row * words + int(bit >> 5u);
      const unsigned sh = bit & 31u;
      unsigned q = wq[w] >> sh;
      if (sh + (unsigned)(bits) > 32u) {
        q |= wq[w + 1] << (32u - sh);  // the code straddles two words (3, 5, 6, 7 bits)
      }
      q &= mask;
      if (trellis != 0) {  // a code's low bit never straddles: it sits in word w of its row
        const unsigned s2 = row >= 2 ? (wq[w - 2 * words] >> sh) & 1u : 0u;
        const unsigned s1 = row >= 1 ? (wq[w - words] >> sh) & 1u : 0u;
        q |= ((s2 << 1u) | s1) << (unsigned)(bits);
      }
      acc += cbs[q] * scales[row * ng + c / group] * xs[j];
    }
  }
}
red[tid] = acc;
__syncthreads();
for (int s = 16; s > 0; s >>= 1) {
  if (lane < s) {
    red[tid] += red[tid + s];
  }
  __syncthreads();
}
if (lane == 0 && row < rows && t < T) {
  y[t * rows + row] = red[tid];
}

// === kernel: rotq_matmul_prefill ===
// Threadgroup (256, 1, 1); grid (256, ceil(rows / 32), ceil(T / 32)).
// A 32-row x 32-column weight tile is synthesized into shared memory once (4 entries per thread) and
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
const unsigned mask = (1u << (unsigned)(bits)) - 1u;
const int tid = int(threadIdx.x);
const int r0 = int(blockIdx.y) * 32;
const int t0 = int(blockIdx.z) * 32;
const int tr = tid / 16;  // output rows 2*tr, 2*tr+1 of the tile
const int tt = tid % 16;  // output tokens 2*tt, 2*tt+1 of the tile
__shared__ float wt[32 * 33];  // weight tile, padded rows
__shared__ float xt[32 * 33];  // x tile (tokens x columns)
__shared__ float cbs[1024];
for (int i = tid; i < ncb; i += 256) {
  cbs[i] = codebook[i];
}
float acc00 = 0.0f, acc01 = 0.0f, acc10 = 0.0f, acc11 = 0.0f;
for (int c0 = 0; c0 < cols; c0 += 32) {
  const int n = min(32, cols - c0);
  __syncthreads();  // the last tiles are read; codebook in
  for (int e = tid; e < 32 * 32; e += 256) {
    const int tk = e / 32, j = e % 32;
    xt[tk * 33 + j] = (t0 + tk < T && j < n) ? x[(t0 + tk) * cols + c0 + j] : 0.0f;
    const int row = r0 + tk;  // the weight entry of the same index: tile row tk, column j
    float wv = 0.0f;
    if (row < rows && j < n) {
      const int c = c0 + j;
      const unsigned bit = (unsigned)(c) * (unsigned)(bits);
      const int w = row * words + int(bit >> 5u);
      const unsigned sh = bit & 31u;
      unsigned q = wq[w] >> sh;
      if (sh + (unsigned)(bits) > 32u) {
        q |= wq[w + 1] << (32u - sh);
      }
      q &= mask;
      if (trellis != 0) {
        const unsigned s2 = row >= 2 ? (wq[w - 2 * words] >> sh) & 1u : 0u;
        const unsigned s1 = row >= 1 ? (wq[w - words] >> sh) & 1u : 0u;
        q |= ((s2 << 1u) | s1) << (unsigned)(bits);
      }
      wv = cbs[q] * scales[row * ng + c / group];
    }
    wt[tk * 33 + j] = wv;
  }
  __syncthreads();
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
