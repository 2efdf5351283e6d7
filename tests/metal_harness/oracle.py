"""Random FGS codes and a float64 numpy decode of each level, written from the math in fgs/codes.py.

Independent of the codec's own decoders on purpose: it is the oracle the ops, layers and kernels are
checked against.
"""

from __future__ import annotations

import numpy as np

from mmt_mlx.fgs.codes import CirculantCode, GaussianCode, Level, QuantCode, RotQCode, TensorCode


def random_gaussian(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    k: int,
    grid: list[float] | None = None,
    perm: bool = True,
) -> GaussianCode:
    grid = grid if grid is not None else [0.3, 1.0, 2.5, 7.0, 40.0]
    return GaussianCode(
        rows=rows,
        cols=cols,
        sigma_grid=list(grid),
        amp=rng.normal(size=(rows, k)).astype(np.float32),
        mu=rng.integers(0, cols, size=(rows, k)).astype(np.int32),
        sidx=rng.integers(0, len(grid), size=(rows, k)).astype(np.uint8),
        perm=rng.permutation(cols).astype(np.int32) if perm else None,
    )


def random_circulant(rng: np.random.Generator, rows: int, cols: int, block: int) -> CirculantCode:
    rb, cb = -(-rows // block), -(-cols // block)
    spec = np.fft.rfft(rng.normal(size=(rb, cb, block)), axis=-1)
    return CirculantCode(rows, cols, block, spec.real.astype(np.float32), spec.imag.astype(np.float32))


def random_quant(rng: np.random.Generator, rows: int, cols: int, bits: int, group: int) -> QuantCode:
    """Random packed codes (bits in 2, 4, 8: values never straddle a uint32 word)."""
    per = 32 // bits
    q = rng.integers(0, 2**bits, size=(rows, cols), dtype=np.uint64)
    shifts = (np.arange(per, dtype=np.uint64) * bits)[None, None, :]
    wq = (q.reshape(rows, cols // per, per) << shifts).sum(-1).astype(np.uint32)
    ng = cols // group
    return QuantCode(
        rows,
        cols,
        bits,
        group,
        wq,
        (rng.uniform(0.01, 0.1, size=(rows, ng))).astype(np.float16),
        (rng.normal(scale=0.1, size=(rows, ng))).astype(np.float16),
    )


def random_rotq(
    rng: np.random.Generator, rows: int, cols: int, bits: int, group: int, trellis: bool
) -> RotQCode:
    """Random rotq codes: each row's indices a little-endian bit stream (packed here bit by bit), a random
    codebook (4 << bits levels for trellis codes), f16 group scales."""
    q = rng.integers(0, 2**bits, size=(rows, cols))
    stream = ((q[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(rows, cols * bits)
    wq = np.packbits(stream, axis=1, bitorder="little").view("<u4").astype(np.uint32)
    levels = (4 << bits) if trellis else 2**bits
    return RotQCode(
        rows=rows,
        cols=cols,
        bits=bits,
        group_size=group,
        seed=int(rng.integers(1, 1000)),
        codebook=np.sort(rng.normal(size=levels)).astype(np.float32),
        wq=wq,
        scales=rng.uniform(0.01, 0.1, size=(rows, cols // group)).astype(np.float16),
        trellis=2 if trellis else 0,
    )


def decode_rotq_rotated(c: RotQCode) -> np.ndarray:
    """The rotated weights Wr (rows, cols) float64 that the rotq kernels multiply with (x already rotated)."""
    bits = np.unpackbits(c.wq.astype("<u4").view(np.uint8), axis=1, bitorder="little")
    bits = bits.reshape(c.rows, c.cols, c.bits).astype(np.int64)
    q = (bits << np.arange(c.bits)).sum(-1)
    if c.trellis:
        low = np.vstack([np.zeros((2, c.cols), np.int64), q & 1])
        q = (((low[:-2] << 1) | low[1:-1]) << c.bits) | q  # the low bits of the two rows above
    s = np.repeat(np.asarray(c.scales, np.float64), c.group_size, axis=1)
    return np.asarray(c.codebook, np.float64)[q] * s


def decode_gaussian(c: GaussianCode) -> np.ndarray:
    amp = np.asarray(c.amp, dtype=np.float64)
    j = np.arange(c.cols, dtype=np.float64)[None, :]
    wp = np.zeros((c.rows, c.cols))
    for k in range(amp.shape[1]):
        s = np.asarray(c.sigma_grid, dtype=np.float64)[c.sidx[:, k]][:, None]
        wp += amp[:, k, None] * np.exp(-((j - c.mu[:, k, None]) ** 2) / (2 * s**2))
    if c.perm is None:
        return wp
    w = np.empty_like(wp)
    w[:, c.perm] = wp
    return w


def decode_circulant(c: CirculantCode) -> np.ndarray:
    b = c.block
    taps = np.fft.irfft(c.spec_re.astype(np.float64) + 1j * c.spec_im, n=b, axis=-1)  # (Rb, Cb, b)
    m = np.arange(b)
    tiles = taps[:, :, (m[:, None] - m[None, :]) % b]  # (Rb, Cb, b, b): T[m, n] = c[(m - n) mod b]
    rb, cb = taps.shape[:2]
    return tiles.transpose(0, 2, 1, 3).reshape(rb * b, cb * b)[: c.rows, : c.cols]


def decode_quant(c: QuantCode) -> np.ndarray:
    per = 32 // c.bits
    shifts = (np.arange(per, dtype=np.uint64) * c.bits)[None, None, :]
    q = ((c.wq.astype(np.uint64)[:, :, None] >> shifts) & (2**c.bits - 1)).reshape(c.rows, c.cols)
    g = c.group_size
    s = np.repeat(c.scales.astype(np.float64), g, axis=1)
    b = np.repeat(c.biases.astype(np.float64), g, axis=1)
    return s * q + b


def decode_level(lv: Level) -> np.ndarray:
    if isinstance(lv, GaussianCode):
        return decode_gaussian(lv)
    if isinstance(lv, CirculantCode):
        return decode_circulant(lv)
    return decode_quant(lv)


def decode_tensor(tc: TensorCode) -> np.ndarray:
    return sum(decode_level(lv) for lv in tc.levels)
