"""Group-affine quantization in numpy, in exactly MLX's layout (``mx.quantize`` / ``mx.dequantize``).

w[i, j] = scales[i, j // g] * q[i, j] + biases[i, j // g], q in [0, 2**bits - 1].
The grid is min/max per group (scale = (max - min) / (2**bits - 1), bias = min), NOT mx.quantize's own
choice: on Q4_1 sources (min/max grid, f16 d and m) 4-bit g32 then reproduces the weights exactly.
With ``search=True`` each group instead takes the shrink of [min, max] (from SHRINKS, 1.0 included, so never
worse than min/max) with the least column-weighted squared error: below 4 bits that is what keeps quality
(README, "Below 4 bits").
Scales and biases are rounded to float16 *before* q is computed, so the stored code is self-consistent.

Packing: each row's q values form a little-endian bit stream (value j at bit j * bits), stored as uint32
words. For 2/4/8 bits that is MLX's word-wise packing; for 3/5/6 bits MLX packs 8 (or 4) values into
3/5/6 (or 3) bytes, which is the same stream. Verified against mx.dequantize in tests/test_codecs.py.
"""

from __future__ import annotations

import numpy as np

from mmt_mlx.fgs.codes import QuantCode

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUPS = (32, 64, 128)
_CHUNK = 1 << 22  # elements per row-chunk: bounds temporaries on 262144 x 640 embeddings
SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def quant_nbytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Stored bytes of a QuantCode: packed words + f16 scales + f16 biases."""
    words = -(-cols * bits // 32)
    return rows * words * 4 + 2 * rows * (cols // group_size) * 2


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK // max(cols, 1))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) ints in [0, 2**bits) -> (rows, cols * bits / 32) uint32, little-endian bit stream."""
    rows, cols = q.shape
    if (cols * bits) % 32:
        raise ValueError(f"cols * bits must be a multiple of 32 (cols={cols}, bits={bits})")
    if cols % 8:
        raise ValueError("cols must be a multiple of 8")
    # 8 values -> one 64-bit integer holding 8 * bits bits -> its low `bits` bytes
    v = q.reshape(rows, cols // 8, 8).astype(np.uint64)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))[None, None, :]
    acc = np.bitwise_or.reduce(v << shifts, axis=2)  # (rows, cols // 8) uint64
    by = acc.astype("<u8").view(np.uint8).reshape(rows, cols // 8, 8)[:, :, :bits]
    return np.ascontiguousarray(by).reshape(rows, cols * bits // 8).view("<u4").astype(np.uint32)


def unpack_bits(wq: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of pack_bits: (rows, words) uint32 -> (rows, cols) uint8."""
    rows = wq.shape[0]
    by = np.ascontiguousarray(wq).astype("<u4").view(np.uint8).reshape(rows, cols // 8, bits)
    full = np.zeros((rows, cols // 8, 8), dtype=np.uint8)
    full[:, :, :bits] = by
    acc = full.reshape(rows, cols).view("<u8").reshape(rows, cols // 8, 1)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(bits))[None, None, :]
    q = (acc >> shifts) & np.uint64((1 << bits) - 1)
    return q.reshape(rows, cols).astype(np.uint8)


def _grid(lo: np.ndarray, hi: np.ndarray, nq: int, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """f16 (scale, bias) of [lo, hi] shrunk about its centre by ``shrink``."""
    if shrink == 1.0:  # exactly min/max, so Q4_1-style grids are reproduced bit for bit
        return ((hi - lo) / np.float32(nq)).astype(np.float16), lo.astype(np.float16)
    mid, half = (lo + hi) * np.float32(0.5), (hi - lo) * np.float32(0.5 * shrink)
    return (2 * half / np.float32(nq)).astype(np.float16), (mid - half).astype(np.float16)


def _round(wg: np.ndarray, scale: np.ndarray, bias: np.ndarray, nq: int) -> np.ndarray:
    s32 = scale.astype(np.float32)[:, :, None]
    b32 = bias.astype(np.float32)[:, :, None]
    safe = np.where(s32 == 0, np.float32(1), s32)
    # q against the f16-rounded grid: the decode the runtime sees is exactly scale * q + bias
    q = np.rint((wg - b32) / safe)
    np.clip(q, 0, nq, out=q)
    return np.where(s32 == 0, 0, q)


def _quantize_block(
    w: np.ndarray, bits: int, g: int, col_weight: np.ndarray | None = None, search: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = w.shape
    wg = w.reshape(rows, cols // g, g)
    lo = wg.min(axis=2)
    hi = wg.max(axis=2)
    nq = (1 << bits) - 1
    scale, bias = _grid(lo, hi, nq, 1.0)
    q = _round(wg, scale, bias, nq)
    if search:
        cw2 = None if col_weight is None else (col_weight.astype(np.float32) ** 2).reshape(1, cols // g, g)

        def err(q, scale, bias):
            d = wg - (q * scale.astype(np.float32)[:, :, None] + bias.astype(np.float32)[:, :, None])
            d *= d
            return (d if cw2 is None else d * cw2).sum(axis=2)

        best = err(q, scale, bias)
        for shrink in SHRINKS[1:]:
            s2, b2 = _grid(lo, hi, nq, shrink)
            q2 = _round(wg, s2, b2, nq)
            e2 = err(q2, s2, b2)
            better = e2 < best
            best = np.where(better, e2, best)
            scale, bias = np.where(better, s2, scale), np.where(better, b2, bias)
            q = np.where(better[:, :, None], q2, q)
    return q.astype(np.uint8).reshape(rows, cols), scale, bias


def quantize(
    w: np.ndarray,
    bits: int = 4,
    group_size: int = 64,
    col_weight: np.ndarray | None = None,
    search: bool = False,
) -> QuantCode:
    """Group-affine quantization of a (rows, cols) matrix into MLX's layout (min/max grid, or searched)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"cols={cols} is not a multiple of group_size={group_size}")
    words = cols * bits // 32
    wq = np.empty((rows, words), dtype=np.uint32)
    scales = np.empty((rows, cols // group_size), dtype=np.float16)
    biases = np.empty_like(scales)
    for a, b in _row_chunks(rows, cols):
        q, s, bb = _quantize_block(w[a:b], bits, group_size, col_weight, search)
        wq[a:b] = pack_bits(q, bits)
        scales[a:b] = s
        biases[a:b] = bb
    return QuantCode(rows, cols, bits, group_size, wq, scales, biases)


def dequantize(code: QuantCode, rows: slice | None = None) -> np.ndarray:
    """Reference decode (float32), optionally of a row slice only."""
    sl = rows if rows is not None else slice(0, code.rows)
    wq, s, b = code.wq[sl], code.scales[sl], code.biases[sl]
    n = wq.shape[0]
    out = np.empty((n, code.cols), dtype=np.float32)
    g = code.group_size
    for a, e in _row_chunks(n, code.cols):
        q = unpack_bits(wq[a:e], code.bits, code.cols).reshape(e - a, code.cols // g, g)
        v = (
            q.astype(np.float32) * s[a:e].astype(np.float32)[:, :, None]
            + b[a:e].astype(np.float32)[:, :, None]
        )
        out[a:e] = v.reshape(e - a, code.cols)
    return out


def quant_error_sq(
    w: np.ndarray, bits: int, group_size: int, col_weight: np.ndarray | None = None, search: bool = False
) -> float:
    """Weighted squared error ||(w - deq(quant(w))) * col_weight||^2 without packing (for screening)."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    total = 0.0
    for a, b in _row_chunks(rows, cols):
        q, s, bb = _quantize_block(w[a:b], bits, group_size, col_weight, search)
        g = group_size
        v = q.reshape(b - a, cols // g, g).astype(np.float32) * s.astype(np.float32)[:, :, None]
        v += bb.astype(np.float32)[:, :, None]
        d = w[a:b] - v.reshape(b - a, cols)
        if col_weight is not None:
            d *= col_weight[None, :]
        total += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
    return total
