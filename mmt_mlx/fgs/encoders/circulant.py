"""Block-circulant level: the best fit of W by b x b circulant tiles, stored as rfft spectra.

Tile (I, J) is T[m, n] = c_IJ[(m - n) mod b]. The Frobenius projection onto circulants sets c[k] to the
(weighted) mean of the tile's k-th circular diagonal; entries in the zero padding beyond W's edge are
left out of that mean (they are cropped away on decode), so the fit is the least-squares one for W itself.
"""

from __future__ import annotations

import numpy as np

from mmt_mlx.fgs.codes import CirculantCode


def _tiles(a: np.ndarray, b: int) -> np.ndarray:
    """(rows, cols) -> zero-padded (Rb, Cb, b, b) tiles."""
    rows, cols = a.shape
    rb, cb = -(-rows // b), -(-cols // b)
    p = np.zeros((rb * b, cb * b), dtype=np.float32)
    p[:rows, :cols] = a
    return p.reshape(rb, b, cb, b).transpose(0, 2, 1, 3)


def fit_circulant(
    w: np.ndarray, block: int, col_weight: np.ndarray | None = None, dtype: type = np.float16
) -> CirculantCode:
    """Weighted least-squares block-circulant fit; spectra rounded to ``dtype``."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    b = block
    wt = np.ones(cols, dtype=np.float32) if col_weight is None else np.asarray(col_weight, np.float32)
    w2 = np.broadcast_to((wt * wt)[None, :], (rows, cols))
    num = _tiles(w * w2, b)  # sum of w^2 * W over each diagonal ...
    den = _tiles(np.ascontiguousarray(w2), b)  # ... divided by sum of w^2 (0 in the padding)
    m = np.arange(b)
    k = np.arange(b)
    n_idx = (m[None, :] - k[:, None]) % b  # diagonal k holds T[m, (m - k) mod b]
    c_num = num[:, :, m[None, :], n_idx].sum(axis=-1)  # (Rb, Cb, b)
    c_den = den[:, :, m[None, :], n_idx].sum(axis=-1)
    c = np.where(c_den > 0, c_num / np.maximum(c_den, 1e-30), 0.0)
    spec = np.fft.rfft(c.astype(np.float64), axis=-1)
    return CirculantCode(rows, cols, b, spec.real.astype(dtype), spec.imag.astype(dtype))


def decode_circulant(code: CirculantCode) -> np.ndarray:
    """Reference decode: (rows, cols) float32."""
    b = code.block
    spec = code.spec_re.astype(np.float64) + 1j * code.spec_im.astype(np.float64)
    c = np.fft.irfft(spec, n=b, axis=-1)  # (Rb, Cb, b)
    m = np.arange(b)
    tiles = c[:, :, (m[:, None] - m[None, :]) % b]  # (Rb, Cb, b, b)
    rb, cb = c.shape[:2]
    full = tiles.transpose(0, 2, 1, 3).reshape(rb * b, cb * b)
    return full[: code.rows, : code.cols].astype(np.float32)


def circulant_nbytes(code: CirculantCode) -> int:
    return int(code.spec_re.nbytes + code.spec_im.nbytes)


def circulant_matvec(code: CirculantCode, x: np.ndarray) -> np.ndarray:
    """y = W_hat @ x through the spectra (the runtime's formula), for checking the convention."""
    b = code.block
    rb, cb = code.spec_re.shape[:2]
    xp = np.zeros(cb * b)
    xp[: code.cols] = x
    xf = np.fft.rfft(xp.reshape(cb, b), axis=-1)
    spec = code.spec_re.astype(np.float64) + 1j * code.spec_im.astype(np.float64)
    y = np.fft.irfft((spec * xf[None]).sum(axis=1), n=b, axis=-1).reshape(rb * b)
    return y[: code.rows]
