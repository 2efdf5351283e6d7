"""The "rotq" level: y = Wr (R x), Wr from Gaussian codes. On a CPU with the native kernels the rotation and the
product are one node each (``native.fft_rotate``, ``native.codebook_matmul``); on a Metal or CUDA GPU one kernel
of ours rotates a decode token (``kernels.rotate_direct``; prompts: MLX's FFT) and one synthesizes Wr from the
codes inside the product (``kernels.rotq_matmul``);
elsewhere the MLX reference path below rotates with mx.fft and decodes Wr tile by tile.

R is the seeded FFT rotation of ``rotation.py`` (one rfft/irfft pair per input); consecutive levels that
receive the same input array with the same seed (q/k/v, gate/up) reuse one rotated copy. The codes are
decoded in bounded row tiles (never the whole dense matrix): MLX's own ``dequantize`` with unit scales and
zero biases unpacks the bit stream (its 2..8-bit packing is the stream ``quant.pack_bits`` writes), then the
codebook lookup and the per-group scales give the tile. Embedding rows are decoded, then un-rotated.
"""

from __future__ import annotations

from functools import cached_property

import mlx.core as mx
import numpy as np
from mlx import nn

from mmt_mlx import native
from mmt_mlx.fgs.codes import RotQCode
from mmt_mlx.fgs.encoders.rotation import rotation_params
from mmt_mlx.fgs.runtime import kernels as K

_TILE_ELEMS = 1 << 20  # decoded weights held at once per product


class _RotationMemo:
    """The last rotated input: levels fed the same array object with the same seed (on the same path, native
    or MLX ops) share one FFT pair."""

    def __init__(self) -> None:
        self.x: mx.array | None = None
        self.key: tuple[int, bool, bool] = (-1, False, False)
        self.xr: mx.array | None = None

    def get(self, x: mx.array, key: tuple[int, bool, bool]) -> mx.array | None:
        return self.xr if (self.x is x and self.key == key) else None

    def put(self, x: mx.array, key: tuple[int, bool, bool], xr: mx.array) -> None:
        self.x, self.key, self.xr = x, key, xr


_MEMO = _RotationMemo()


class Rotation:
    """R and R^T of width n along the last axis, in MLX (f32)."""

    def __init__(self, n: int, seed: int, use_kernel: bool = False) -> None:
        signs, phase = rotation_params(n, seed)
        self.n, self.seed, self.use_kernel = n, seed, use_kernel
        self.signs = mx.array(np.asarray(signs, np.float32))
        self.phase = mx.array(np.asarray(phase, np.complex64))
        self.phase_conj = mx.array(np.conj(phase).astype(np.complex64))
        # the native kernel's form of the same factors: (n // 2 + 1, 2) real and imaginary parts
        self.phase_re_im = mx.array(np.stack([phase.real, phase.imag], -1).astype(np.float32))

    @cached_property
    def filt(self) -> mx.array:
        """The GPU kernel's form: the circulant's real filter irfft(phase), applied directly to a decode token."""
        _, phase = rotation_params(self.n, self.seed)
        return mx.array(np.fft.irfft(phase.astype(np.complex128), self.n).astype(np.float32))

    def _direct(self, x: mx.array) -> bool:
        return self.use_kernel and K.rotate_direct_fits(x.size // max(1, self.n), self.n)

    def forward(self, x: mx.array) -> mx.array:
        direct = self._direct(x)
        key = (self.seed, native.enabled(), direct)
        hit = _MEMO.get(x, key)
        if hit is not None:
            return hit
        if direct:  # one GPU dispatch instead of four (kernels/rotation.*)
            xr = K.rotate_direct(x, self.signs, self.filt)
        elif key[1]:  # one node instead of ~6 (kernels/cpu/rotation.cpp)
            xr = native.fft_rotate(x, self.signs, self.phase_re_im)
        else:
            f = mx.fft.rfft(x.astype(mx.float32) * self.signs, axis=-1)
            xr = mx.fft.irfft(f * self.phase, n=self.n, axis=-1)
        _MEMO.put(x, key, xr)
        return xr

    def inverse(self, y: mx.array) -> mx.array:
        if self._direct(y):
            return K.rotate_direct(y, self.signs, self.filt, inverse=True)
        if native.enabled():
            return native.fft_rotate(y, self.signs, self.phase_re_im, inverse=True)
        f = mx.fft.rfft(y.astype(mx.float32), axis=-1)
        return mx.fft.irfft(f * self.phase_conj, n=self.n, axis=-1) * self.signs


class RotQLevel(nn.Module):
    def __init__(self, code: RotQCode, use_kernel: bool = False):
        super().__init__()
        self.rows, self.cols = code.rows, code.cols
        self.bits, self.group_size = code.bits, code.group_size
        self.trellis = code.trellis  # trellis codes: a value depends on the codes of the two rows above it
        self.use_kernel = use_kernel  # the GPU kernel (kernels/rotq_matmul.*); CPUs run the native one
        self.rotation = Rotation(code.cols, code.seed, use_kernel)
        self.codebook = mx.array(np.asarray(code.codebook, np.float32))
        self.wq = mx.array(np.asarray(code.wq, np.uint32))
        self.scales = mx.array(code.group_scales())  # f32 (from f16 or log-scale codes): faster on CPU
        ng = code.cols // code.group_size
        self._unit = mx.ones((1, ng), mx.float32)
        self._zero = mx.zeros((1, ng), mx.float32)
        self.tile = max(1, min(self.rows, _TILE_ELEMS // max(1, self.cols)))

    def _codes(self, wq: mx.array) -> mx.array:
        """Code indices (n, cols) uint32 of packed rows (n, words)."""
        n = wq.shape[0]
        if native.enabled():  # one node; MLX's CPU dequantize is ~15 nodes of scalar ops (embedding lookups)
            ng = self._unit.shape[1]
            q = native.dequantize(wq, mx.ones((n, ng), mx.float32), mx.zeros((n, ng), mx.float32),
                                  self.group_size, self.bits)  # fmt: skip
            return q.astype(mx.uint32)
        ones = mx.broadcast_to(self._unit, (n, self._unit.shape[1]))
        zeros = mx.broadcast_to(self._zero, (n, self._zero.shape[1]))
        q = mx.dequantize(wq, ones, zeros, group_size=self.group_size, bits=self.bits)
        return q.astype(mx.uint32)

    def _decode(self, q: mx.array, scales: mx.array, state: mx.array | None = None) -> mx.array:
        """Rotated weight rows (n, cols) f32 of codes q (n, cols), their scales (n, groups) and, for trellis
        codes, each code's state (n, cols)."""
        n = q.shape[0]
        idx = q if state is None else (state << self.bits) | q
        v = mx.take(self.codebook, idx)
        g = self.group_size
        return (v.reshape(n, -1, g) * scales[:, :, None]).reshape(n, self.cols)

    def _tile_state(self, q: mx.array, a: int) -> mx.array | None:
        """States of the codes q of rows [a, a + n): the low bits of the two rows above each (codes.py)."""
        if not self.trellis:
            return None
        above = self._codes(self.wq[max(0, a - 2) : a]) & 1 if a > 0 else mx.zeros((0, self.cols), mx.uint32)
        if above.shape[0] < 2:
            above = mx.concatenate([mx.zeros((2 - above.shape[0], self.cols), mx.uint32), above])
        x = mx.concatenate([above, q & 1])
        return (x[:-2] << 1) | x[1:-1]

    def __call__(self, x: mx.array) -> mx.array:
        xr = self.rotation.forward(x)
        if self.use_kernel:
            return K.rotq_matmul(
                xr, self.wq, self.scales, self.codebook, self.bits, self.group_size, self.trellis
            )
        # the integer GEMM of kernels/cpu/int_gemm.inc, scalar or trellis codes (a lut of 4 << bits levels)
        if native.codebook_enabled(self.group_size):
            return native.codebook_matmul(xr, self.wq, self.scales, self.codebook, self.group_size, self.bits)
        outs = []
        for a in range(0, self.rows, self.tile):
            b = min(self.rows, a + self.tile)
            q = self._codes(self.wq[a:b])
            w = self._decode(q, self.scales[a:b], self._tile_state(q, a))
            outs.append(xr @ w.T)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)

    def decode_rows(self, ids: mx.array) -> mx.array:
        """Rows ``ids`` of W (n, cols) f32: decoded in the rotated basis, then un-rotated."""
        q = self._codes(mx.take(self.wq, ids, axis=0))
        state = None
        if self.trellis:  # the low bits of rows ids - 2 and ids - 1 (zero above row 0)
            ids = ids.astype(mx.int32)
            x = [
                mx.where(
                    (ids >= d)[:, None], self._codes(mx.take(self.wq, mx.maximum(ids - d, 0), axis=0)) & 1, 0
                )
                for d in (2, 1)
            ]
            state = (x[0] << 1) | x[1]
        wr = self._decode(q, mx.take(self.scales, ids, axis=0), state)
        return self.rotation.inverse(wr)
