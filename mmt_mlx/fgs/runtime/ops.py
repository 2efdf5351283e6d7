"""Reference FGS products in plain MLX ops (the path used on Linux CPU and as the kernels' oracle).

None of these functions builds a dense (rows, cols) weight matrix: the Gaussian level works on blurred
copies of the input (S x cols numbers per token), the circulant level on spectra, and the quant level
dequantizes a bounded tile of rows at a time. Math conventions are those of ``mmt_mlx.fgs.codes``.

Speed notes (MLX 0.32 on Linux CPU, measured; see bench/fgs_ops.py):
- ``mx.take`` costs ~19 ns per element, ``take_along_axis`` on a broadcast source ~2.5 ns: the Gaussian
  gather uses the latter.
- ``mx.fft`` is slow for many short rows, so narrow widths blur with a banded ``conv1d`` and only wide
  widths go through the FFT.
- ``quantized_matmul`` runs ~2 GFLOP/s on CPU; for more than a few tokens dequantizing a row tile into
  f32 and using the (OpenBLAS) f32 GEMM is faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

# A Gaussian tap below exp(-28) (~7e-13) of the peak is dropped: far below f32 rounding of the sum.
_REACH_SIGMAS = math.sqrt(2.0 * 28.0)
# Widths whose half-band is at most this many columns are blurred with a banded conv1d, wider ones by FFT.
_MAX_CONV_REACH = 12
# Bound on temporaries (elements) of the gather and of dequantized tiles: 2**20 f32 = 4 MB (MLX's
# CPU dequantize peaks at ~4x its output, so a tile costs ~16 MB at most).
_TEMP_ELEMS = 1 << 20
# Up to this many tokens mx.quantized_matmul beats dequantize + GEMM on CPU (bench/fgs_ops.py).
_QMM_MAX_TOKENS_CPU = 2


def _flatten(x: mx.array) -> tuple[mx.array, tuple[int, ...]]:
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]), lead


def _compute_dtype(x: mx.array) -> mx.Dtype:
    # f16/bf16 matmul runs ~2 GFLOP/s on Linux CPU: compute in f32 there.
    if mx.default_device() == mx.cpu:
        return mx.float32
    return x.dtype if x.dtype in (mx.float16, mx.bfloat16, mx.float32) else mx.float32


def _fast_len(n: int) -> int:
    """Smallest 5-smooth length >= n (FFTs of such lengths are fast)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def gaussian_reach(sigma: float, cols: int) -> int:
    """Half-width (columns) beyond which a bump of this width is below f32 resolution."""
    return int(min(cols - 1, math.ceil(sigma * _REACH_SIGMAS)))


@dataclass(frozen=True)
class GaussianPlan:
    """How to blur a (T, cols) input with every width of a sigma grid.

    The blurred result is laid out (T, cols, S) in *plan order* (conv widths first, then FFT widths);
    ``slot[s]`` is the position of grid width s in that order, so a bump reads flat index mu * S + slot[s].
    """

    cols: int
    sigma_grid: tuple[float, ...]
    slot: tuple[int, ...]
    conv_w: mx.array | None  # (S_conv, 2r+1, 1) taps, zero-padded to a common reach r
    conv_reach: int
    fft_h: mx.array | None  # (S_fft, n//2+1) real spectra of the symmetric kernels
    fft_n: int

    def flat_index(self, mu: mx.array, sidx: mx.array) -> mx.array:
        slot = mx.array(np.asarray(self.slot, dtype=np.int32))
        s = len(self.sigma_grid)
        return mu.astype(mx.int32) * s + mx.take(slot, sidx.astype(mx.int32))

    def blur(self, xp: mx.array) -> mx.array:
        """(T, cols) -> (T, cols * S): B[t, j*S + slot[s]] = sum_c g_s(c - j) xp[t, c]."""
        t = xp.shape[0]
        parts = []
        if self.conv_w is not None:
            # MLX conv1d is a correlation; the taps are symmetric so it equals the convolution.
            parts.append(mx.conv1d(xp[:, :, None], self.conv_w, padding=self.conv_reach))
        if self.fft_h is not None:
            spec = mx.fft.rfft(xp, n=self.fft_n)
            b = mx.fft.irfft(spec[:, None, :] * self.fft_h[None], n=self.fft_n)[..., : self.cols]
            parts.append(mx.swapaxes(b, 1, 2))
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
        return out.reshape(t, -1)


@lru_cache(maxsize=256)
def gaussian_plan(sigma_grid: tuple[float, ...], cols: int) -> GaussianPlan:
    reach = [gaussian_reach(s, cols) for s in sigma_grid]
    conv = [i for i, r in enumerate(reach) if r <= _MAX_CONV_REACH]
    fft = [i for i, r in enumerate(reach) if r > _MAX_CONV_REACH]
    order = conv + fft
    slot = [0] * len(sigma_grid)
    for pos, s in enumerate(order):
        slot[s] = pos
    conv_w, conv_r = None, 0
    if conv:
        conv_r = max(reach[i] for i in conv)
        d = np.arange(-conv_r, conv_r + 1, dtype=np.float64)
        taps = np.stack([np.exp(-(d**2) / (2.0 * sigma_grid[i] ** 2)) for i in conv])
        taps[np.abs(d)[None, :] > np.array([reach[i] for i in conv])[:, None]] = 0.0
        conv_w = mx.array(taps.astype(np.float32)[:, :, None])
    fft_h, n = None, 0
    if fft:
        r = max(reach[i] for i in fft)
        n = _fast_len(cols + r)  # n >= cols + r: circular wrap never reaches a kept tap
        d = np.arange(n)
        d = np.minimum(d, n - d).astype(np.float64)  # circular distance
        ker = np.stack([np.exp(-(d**2) / (2.0 * sigma_grid[i] ** 2)) * (d <= reach[i]) for i in fft])
        fft_h = mx.array(np.fft.rfft(ker, axis=-1).real.astype(np.float32))  # symmetric -> real
    return GaussianPlan(cols, tuple(sigma_grid), tuple(slot), conv_w, conv_r, fft_h, n)


def gaussian_matmul(
    x: mx.array,
    amp: mx.array,
    mu: mx.array,
    sidx: mx.array,
    sigma_grid: list[float] | tuple[float, ...],
    perm: mx.array | None = None,
    *,
    flat_index: mx.array | None = None,
) -> mx.array:
    """y = W @ x for the Gaussian-row level; x (..., cols) -> (..., rows).

    ``flat_index`` (from ``gaussian_plan(...).flat_index(mu, sidx)``) may be passed to skip recomputing it.
    """
    xf, lead = _flatten(x)
    cols = xf.shape[-1]
    rows, k = amp.shape
    plan = gaussian_plan(tuple(float(s) for s in sigma_grid), cols)
    idx = flat_index if flat_index is not None else plan.flat_index(mu, sidx)
    xf = xf.astype(_compute_dtype(x))
    xp = xf if perm is None else mx.take(xf, perm, axis=1)
    a = amp.astype(xp.dtype)
    s = len(plan.sigma_grid)
    width = cols * s
    # Chunk tokens so the (t, rows, K) gather and the blur temporaries (conv1d unfolds its input:
    # (t, cols, taps), FFT: (t, S, n)) stay bounded; chunks run one after another (mx.depends).
    per_token = max(rows * k, cols * (2 * plan.conv_reach + 1), 2 * s * max(plan.fft_n, 1))
    step = max(1, _TEMP_ELEMS // per_token)
    outs: list[mx.array] = []
    for t0 in range(0, xp.shape[0], step):
        xc = xp[t0 : t0 + step]
        if outs:
            xc = mx.depends(xc, outs[-1])
        b = plan.blur(xc)  # (t, cols*S)
        src = mx.broadcast_to(b[:, None, :], (b.shape[0], rows, width))
        g = mx.take_along_axis(src, idx[None], axis=2)  # (t, rows, K)
        outs.append((g * a).sum(axis=-1))
    y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
    return y.astype(x.dtype).reshape(*lead, rows)


def circulant_spectra(spec_re: mx.array, spec_im: mx.array) -> tuple[mx.array, mx.array]:
    """(Rb, Cb, F) spectra -> (F, Rb, Cb) layout used by ``circulant_matmul`` (do it once per layer)."""
    return mx.transpose(spec_re, (2, 0, 1)), mx.transpose(spec_im, (2, 0, 1))


def circulant_matmul(
    x: mx.array,
    spec_re: mx.array,
    spec_im: mx.array,
    rows: int,
    cols: int,
    block: int,
    *,
    freq_major: bool = False,
) -> mx.array:
    """y = W @ x for the block-circulant level; x (..., cols) -> (..., rows).

    Spectra are (Rb, Cb, F) as stored in a CirculantCode, or (F, Rb, Cb) with ``freq_major=True``
    (``circulant_spectra``), which saves a transpose per call.
    """
    xf, lead = _flatten(x)
    t = xf.shape[0]
    if freq_major:
        sr, si = spec_re, spec_im
    else:
        sr, si = circulant_spectra(spec_re, spec_im)
    _, rb, cb = sr.shape
    xf = xf.astype(mx.float32)
    if cb * block != cols:
        xf = mx.pad(xf, [(0, 0), (0, cb * block - cols)])
    xs = mx.fft.rfft(xf.reshape(t, cb, block), axis=-1)  # (T, Cb, F)
    # per frequency: (Rb, Cb) @ (Cb, 2T) with real and imaginary parts side by side
    xri = mx.concatenate([mx.real(xs), mx.imag(xs)], axis=0)  # (2T, Cb, F)
    xri = mx.transpose(xri, (2, 1, 0))  # (F, Cb, 2T)
    p = sr.astype(mx.float32) @ xri
    q = si.astype(mx.float32) @ xri
    yr = p[..., :t] - q[..., t:]
    yi = p[..., t:] + q[..., :t]
    ys = mx.transpose(yr + 1j * yi, (2, 1, 0))  # (T, Rb, F)
    y = mx.fft.irfft(ys, n=block, axis=-1).reshape(t, rb * block)[:, :rows]
    return y.astype(x.dtype).reshape(*lead, rows)


def dequantize_rows(
    wq: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int, dtype: mx.Dtype
) -> mx.array:
    """Dequantize a few rows (MLX affine layout) into ``dtype``."""
    w = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits)
    return w.astype(dtype)


def quant_matmul(
    x: mx.array,
    wq: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int,
    bits: int,
) -> mx.array:
    """y = W @ x for an MLX-affine quantized level; x (..., cols) -> (..., rows).

    GPU backends: ``mx.quantized_matmul``. CPU: quantized_matmul for a token or two, else row tiles
    dequantized into f32 (at most ``_TEMP_ELEMS`` weights each) times x through the f32 GEMM (the native
    kernels do the same in one node: kernels/cpu/affine_gemm.cpp).
    """
    xf, lead = _flatten(x)
    t, cols = xf.shape
    rows = wq.shape[0]
    on_cpu = mx.default_device() == mx.cpu
    if not on_cpu or t <= _QMM_MAX_TOKENS_CPU:
        xc = xf.astype(mx.float32) if on_cpu else xf
        y = mx.quantized_matmul(xc, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
        return y.astype(x.dtype).reshape(*lead, rows)
    xc = xf.astype(mx.float32)
    tile = max(1, min(rows, _TEMP_ELEMS // cols))
    outs: list[mx.array] = []
    for r0 in range(0, rows, tile):
        wq_t = wq[r0 : r0 + tile]
        if outs:  # MLX would otherwise dequantize every tile before the first product: serialize them
            wq_t = mx.depends(wq_t, outs[-1])
        st, bt = scales[r0 : r0 + tile], biases[r0 : r0 + tile]
        outs.append(xc @ dequantize_rows(wq_t, st, bt, group_size, bits, mx.float32).T)
    y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    return y.astype(x.dtype).reshape(*lead, rows)
