"""MLX modules that run FGS-coded weights without ever holding the dense matrix.

``FGSLinear`` computes y = sum over levels of level_matmul(x) (+ bias); ``FGSEmbedding`` looks rows up
(decoding only the rows asked for) and doubles as a tied LM head through ``as_linear``.

Backend: chosen once per module at construction (``kernels.use_kernels()``): the Metal or CUDA kernels of
``mmt_mlx/fgs/runtime/kernels.py`` where MLX has such a GPU backend, the MLX reference ops of ``ops.py`` otherwise;
``MMT_FGS_BACKEND=reference|kernel`` forces one. The arrays are laid out for the chosen path.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np
from mlx import nn

from mmt_mlx import native
from mmt_mlx.fgs.codes import (
    CirculantCode,
    GaussianCode,
    Level,
    QuantCode,
    RotQCode,
    TensorCode,
    level_shape,
    row_bands,
)
from mmt_mlx.fgs.encoders.gaussian import gaussian_amp
from mmt_mlx.fgs.runtime import kernels as K
from mmt_mlx.fgs.runtime import ops
from mmt_mlx.fgs.runtime.rotq_layer import RotQLevel
from mmt_mlx.fgs.runtime.row_bands import RowBands

_ROW_TEMP_ELEMS = 1 << 21  # bound on (ids, K, cols) temporaries when decoding embedding rows


class _NativeGaussian:
    """A Gaussian level's operands for the native CPU kernel (``kernels/cpu/gaussian_level.h``), made on first
    use; a plain object, so that nn.Module does not count them among the model's parameters."""

    arrays: tuple[mx.array, ...] | None = None


class GaussianLevel(nn.Module):
    def __init__(self, code: GaussianCode, use_kernel: bool):
        super().__init__()
        self.rows, self.cols = code.rows, code.cols
        self.sigma_grid = tuple(float(s) for s in code.sigma_grid)
        self.use_kernel = use_kernel
        self.amp = mx.array(gaussian_amp(code).astype(np.float32))  # L2 meta-code decoded once: tiny
        self.mu = mx.array(np.asarray(code.mu, dtype=np.int32))
        self.sidx = mx.array(np.asarray(code.sidx, dtype=np.uint8))
        perm = np.arange(code.cols) if code.perm is None else np.asarray(code.perm)
        self.has_perm = code.perm is not None
        self.perm = mx.array(perm.astype(np.int32))
        inv = np.empty_like(perm)
        inv[perm] = np.arange(code.cols)
        self.inv_perm = mx.array(inv.astype(np.int32))
        self.gcoef = K.gaussian_coefs(self.sigma_grid)
        self._native = _NativeGaussian()
        if not use_kernel:
            plan = ops.gaussian_plan(self.sigma_grid, self.cols)
            self.flat_index = plan.flat_index(self.mu, self.sidx)

    def native_operands(self) -> tuple[mx.array, ...]:
        """(amp, index, perm, taps, reach) of ``native.gaussian_matmul``: index = width * cols + centre into the
        input blurred at every width, the taps the reference keeps (``ops.gaussian_plan``) centred in one row."""
        if self._native.arrays is None:
            mu, sidx = np.array(self.mu), np.array(self.sidx).astype(np.int32)
            nsig = len(self.sigma_grid)
            if mu.size and (mu.min() < 0 or mu.max() >= self.cols or sidx.max() >= nsig):
                raise ValueError("Gaussian level: a centre or width index is out of range")
            reach = np.array([ops.gaussian_reach(s, self.cols) for s in self.sigma_grid], dtype=np.int32)
            r = int(reach.max())
            d = np.arange(-r, r + 1, dtype=np.float64)
            taps = np.stack(
                [np.exp(-(d**2) / (2.0 * s**2)) * (np.abs(d) <= q) for s, q in zip(self.sigma_grid, reach)]
            )
            perm = np.array(self.perm) if self.has_perm else np.zeros(0, np.int32)
            arrays = (self.amp, mx.array((sidx * self.cols + mu).astype(np.int32)), mx.array(perm.astype(np.int32)),
                      mx.array(taps.astype(np.float32)), mx.array(reach))  # fmt: skip
            mx.eval(arrays)
            self._native.arrays = arrays
        return self._native.arrays

    def __call__(self, x: mx.array) -> mx.array:
        if self.use_kernel:
            return K.gaussian_matmul(x, self.amp, self.mu, self.sidx, self.gcoef, self.perm)
        if native.enabled():
            return native.gaussian_matmul(x, *self.native_operands())
        perm = self.perm if self.has_perm else None
        return ops.gaussian_matmul(
            x, self.amp, self.mu, self.sidx, self.sigma_grid, perm, flat_index=self.flat_index
        )

    def decode_rows(self, ids: mx.array) -> mx.array:
        """Rows ``ids`` (n,) of W, (n, cols) f32, in the original column order."""
        k = self.amp.shape[1]
        j = mx.arange(self.cols, dtype=mx.float32)
        step = max(1, _ROW_TEMP_ELEMS // max(1, k * self.cols))
        outs = []
        for a in range(0, ids.shape[0], step):
            sel = ids[a : a + step]
            amp = mx.take(self.amp, sel, axis=0)[:, :, None]
            mu = mx.take(self.mu, sel, axis=0).astype(mx.float32)[:, :, None]
            c = mx.take(self.gcoef, mx.take(self.sidx, sel, axis=0).astype(mx.int32))[:, :, None]
            d = j - mu
            outs.append((amp * mx.exp(d * d * c)).sum(axis=1))
        wp = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        # W[:, perm[j]] = Wp[:, j]  <=>  W = Wp[:, inv_perm]
        return mx.take(wp, self.inv_perm, axis=1) if self.has_perm else wp


class CirculantLevel(nn.Module):
    def __init__(self, code: CirculantCode, use_kernel: bool):
        super().__init__()
        self.rows, self.cols, self.block = code.rows, code.cols, code.block
        self.use_kernel = use_kernel
        sr = mx.array(np.asarray(code.spec_re, dtype=np.float32))
        si = mx.array(np.asarray(code.spec_im, dtype=np.float32))
        if use_kernel:
            self.spec_re, self.spec_im = sr, si  # (Rb, Cb, F): the kernel reads it as stored
        else:
            # (F, Rb, Cb) contiguous: the reference does per-frequency matmuls without a copy per call
            self.spec_re = mx.contiguous(mx.transpose(sr, (2, 0, 1)))
            self.spec_im = mx.contiguous(mx.transpose(si, (2, 0, 1)))

    def __call__(self, x: mx.array) -> mx.array:
        if self.use_kernel:
            return K.circulant_matmul(x, self.spec_re, self.spec_im, self.rows, self.cols, self.block)
        return ops.circulant_matmul(
            x, self.spec_re, self.spec_im, self.rows, self.cols, self.block, freq_major=True
        )

    def decode_rows(self, ids: mx.array) -> mx.array:
        b = self.block
        blk, m = ids // b, ids % b
        if self.use_kernel:
            sr, si = mx.take(self.spec_re, blk, axis=0), mx.take(self.spec_im, blk, axis=0)
        else:  # (F, Rb, Cb) -> (n, Cb, F)
            sr = mx.transpose(mx.take(self.spec_re, blk, axis=1), (1, 2, 0))
            si = mx.transpose(mx.take(self.spec_im, blk, axis=1), (1, 2, 0))
        c = mx.fft.irfft(sr + 1j * si, n=b, axis=-1)  # (n, Cb, b): first column of each tile
        # tile row m: T[m, q] = c[(m - q) mod b]
        g = (m[:, None] - mx.arange(b)[None, :]) % b
        rows = mx.take_along_axis(c, mx.broadcast_to(g[:, None, :], c.shape), axis=2)
        return rows.reshape(ids.shape[0], -1)[:, : self.cols]


class _OpsScales:
    """An f32 copy of a level's f16 scales for the MLX-ops path, made on first use (a plain object, so that
    nn.Module does not count it among the model's parameters)."""

    pair: tuple[mx.array, mx.array] | None = None


class QuantLevel(nn.Module):
    def __init__(self, code: QuantCode, use_kernel: bool):
        super().__init__()
        self.rows, self.cols = code.rows, code.cols
        self.bits, self.group_size = code.bits, code.group_size
        self.use_kernel = use_kernel
        self._ops_copy = _OpsScales()
        self.wq = mx.array(np.asarray(code.wq, dtype=np.uint32))
        # GPUs and the native CPU kernels read the stored f16 scales (fewer bytes per token); MLX's own CPU
        # dequantize runs ~5x faster with f32 ones, so the MLX-ops path gets an f32 copy when it runs
        sdt = np.float16 if use_kernel or native.available() else np.float32
        self.scales = mx.array(np.asarray(code.scales).astype(sdt))
        self.biases = mx.array(np.asarray(code.biases).astype(sdt))

    def __call__(self, x: mx.array) -> mx.array:
        # native CPU kernel (mmt_mlx/native.py): integer kernels for decode and small batches, the codes
        # decoded in row blocks into OpenBLAS's GEMM for a long prompt (one node either way)
        if native.enabled():
            return native.quant_matmul(x, self.wq, self.scales, self.biases, self.group_size, self.bits)
        s, b = self._ops_scales()
        return ops.quant_matmul(x, self.wq, s, b, self.group_size, self.bits)

    def _ops_scales(self) -> tuple[mx.array, mx.array]:
        if self.use_kernel or self.scales.dtype == mx.float32:
            return self.scales, self.biases
        if (
            self._ops_copy.pair is None
        ):  # native kernels forced off (MMT_NATIVE=0) after loading: convert once
            pair = (self.scales.astype(mx.float32), self.biases.astype(mx.float32))
            mx.eval(pair)  # a stored copy, not two conversion nodes in every graph that uses it
            self._ops_copy.pair = pair
        return self._ops_copy.pair

    def decode_rows(self, ids: mx.array) -> mx.array:
        wq, s, b = (mx.take(a, ids, axis=0) for a in (self.wq, self.scales, self.biases))
        if native.enabled():  # one node; MLX's CPU dequantize is ~15 nodes of scalar ops per decoded token
            return native.dequantize(wq, s, b, self.group_size, self.bits)
        w = mx.dequantize(
            wq, s.astype(mx.float32), b.astype(mx.float32), group_size=self.group_size, bits=self.bits
        )
        return w.astype(mx.float32)


def make_level(level: Level, use_kernel: bool) -> nn.Module:
    if isinstance(level, GaussianCode):
        return GaussianLevel(level, use_kernel)
    if isinstance(level, CirculantCode):
        return CirculantLevel(level, use_kernel)
    if isinstance(level, QuantCode):
        return QuantLevel(level, use_kernel)
    if isinstance(level, RotQCode):
        return RotQLevel(level, use_kernel)
    raise TypeError(f"unknown FGS level {type(level).__name__}")


def _levels(code: TensorCode, use_kernel: bool | None) -> tuple[list[nn.Module], bool]:
    uk = K.use_kernels() if use_kernel is None else use_kernel
    if not code.levels:
        raise ValueError("a TensorCode needs at least one level")
    for lv in code.levels:
        if level_shape(lv) != tuple(code.shape):
            raise ValueError(f"level shape {level_shape(lv)} != tensor shape {tuple(code.shape)}")
    bands = row_bands(code.levels, code.shape[0])
    if bands is not None:  # one module for the bands: their rows partition the tensor
        return [RowBands([make_level(lv, uk) for lv in code.levels], bands, code.shape[0])], uk
    return [make_level(lv, uk) for lv in code.levels], uk


class FusedOperands(NamedTuple):
    """A linear layer's operands in the fused decode layer: its affine level (MLX's layout), and the native
    operands of a Gaussian level added to it (``GaussianLevel.native_operands``) or None."""

    wq: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int
    gaussian: tuple[mx.array, ...] | None


class FGSLinear(nn.Module):
    """y = x @ W.T (+ bias) with W = sum of the code's levels; W has shape (out, in) = code.shape."""

    def __init__(
        self, code: TensorCode, bias: np.ndarray | mx.array | None = None, use_kernel: bool | None = None
    ):
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in code.shape)
        self.levels, self.use_kernel = _levels(code, use_kernel)
        if bias is not None:
            self.bias = mx.array(np.asarray(bias, dtype=np.float32))

    def fused_operands(self) -> FusedOperands | None:
        """What the fused native decode layer takes: W is one affine level, plus at most one Gaussian level, and
        there is no bias; else None."""
        levels = self["levels"]  # item access: nn.Module's attribute fallback costs ~1 us a call, per token
        if "bias" in self:
            return None
        if len(levels) == 1:
            q, g = levels[0], None
        elif len(levels) == 2:  # two summands: their order does not change the sum
            q, g = levels if isinstance(levels[0], QuantLevel) else levels[::-1]
            if not isinstance(g, GaussianLevel):
                return None
        else:
            return None
        if not isinstance(q, QuantLevel):
            return None
        gauss = g.native_operands() if g is not None else None
        return FusedOperands(q["wq"], q["scales"], q["biases"], q.group_size, q.bits, gauss)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.levels[0](x)
        for lv in self.levels[1:]:
            y = y + lv(x)
        if "bias" in self:
            y = y + self.bias.astype(y.dtype)
        return y


class FGSEmbedding(nn.Module):
    """Embedding table W (num_embeddings, dims) = code.shape; only the looked-up rows are decoded."""

    def __init__(self, code: TensorCode, use_kernel: bool | None = None):
        super().__init__()
        self.num_embeddings, self.dims = (int(s) for s in code.shape)
        self.levels, self.use_kernel = _levels(code, use_kernel)

    def __call__(self, ids: mx.array) -> mx.array:
        flat = ids.reshape(-1).astype(mx.int32)
        out = self.levels[0].decode_rows(flat)
        for lv in self.levels[1:]:
            out = out + lv.decode_rows(flat)
        return out.reshape(*ids.shape, self.dims)

    def as_linear(self, x: mx.array) -> mx.array:
        """Tied LM head: x (..., dims) -> logits (..., num_embeddings) = x @ W.T."""
        y = self.levels[0](x)
        for lv in self.levels[1:]:
            y = y + lv(x)
        return y
