"""L2 meta-codes of a (rows, K) amplitude matrix M, compressed across rows: PCA, DCT, Haar.

All three transforms are orthonormal (PCA about the column mean), so the squared error of a truncation is
the energy of what was dropped; encoders pick the smallest size meeting ``rel_err`` = ||M - M_hat||^2 /
||M||^2, or the best fit within ``max_bytes``. Stored arrays are rounded to ``dtype`` first and the
decode always uses the rounded arrays.

Haar layout (the contract with the runtime): rows are zero-padded to N = 2**L; the forward transform
repeats, on the leading n entries (n = N, N/2, ..., 2): a = (x[0::2] + x[1::2]) / sqrt2,
d = (x[0::2] - x[1::2]) / sqrt2, x[:n] = concat(a, d). The coefficient grid is therefore
[approx, coarsest detail, ..., finest details (N/2 rows)] of shape (N, K); ``index`` holds flat
(row-major) indices into it.
"""

from __future__ import annotations

import numpy as np

from mmt_mlx.fgs.codes import MetaCode

METHODS = ("pca", "dct", "haar")


def _energy(m: np.ndarray) -> float:
    return float(np.einsum("ij,ij->", m, m, dtype=np.float64))


def dct_basis(rows: int, keep: int) -> np.ndarray:
    """(rows, keep) orthonormal DCT-II basis: M = B @ C inverts C = B.T @ M (scipy's idct type 2 ortho)."""
    n = np.arange(rows, dtype=np.float64)[:, None]
    k = np.arange(keep, dtype=np.float64)[None, :]
    b = np.cos(np.pi * (2 * n + 1) * k / (2 * rows)) * np.sqrt(2.0 / rows)
    b[:, 0] /= np.sqrt(2.0)
    return b


def haar_forward(m: np.ndarray) -> np.ndarray:
    rows = m.shape[0]
    n = 1 << max(0, int(np.ceil(np.log2(max(rows, 1)))))
    x = np.zeros((n,) + m.shape[1:], dtype=np.float64)
    x[:rows] = m
    r2 = np.sqrt(2.0)
    while n > 1:
        a = (x[0:n:2] + x[1:n:2]) / r2
        d = (x[0:n:2] - x[1:n:2]) / r2
        x[: n // 2], x[n // 2 : n] = a, d
        n //= 2
    return x


def haar_inverse(c: np.ndarray, rows: int) -> np.ndarray:
    x = np.array(c, dtype=np.float64)
    r2 = np.sqrt(2.0)
    n, total = 1, x.shape[0]
    while n < total:
        a, d = x[:n].copy(), x[n : 2 * n].copy()
        x[0 : 2 * n : 2] = (a + d) / r2
        x[1 : 2 * n : 2] = (a - d) / r2
        n *= 2
    return x[:rows]


def meta_nbytes(mc: MetaCode) -> int:
    return int(sum(a.nbytes for a in mc.arrays.values()))


def decode_meta(mc: MetaCode) -> np.ndarray:
    """(rows, K) float32 reconstruction of a meta-code."""
    a = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in mc.arrays.items()}
    if mc.method == "pca":
        out = a["mean"][None, :] + a["coef"] @ a["basis"]
    elif mc.method == "dct":
        out = dct_basis(mc.rows, a["coef"].shape[0]) @ a["coef"]
    elif mc.method == "haar":
        n = 1 << max(0, int(np.ceil(np.log2(max(mc.rows, 1)))))
        grid = np.zeros(n * mc.cols, dtype=np.float64)
        grid[mc.arrays["index"].astype(np.int64)] = a["value"]
        out = haar_inverse(grid.reshape(n, mc.cols), mc.rows)
    else:
        raise ValueError(f"unknown meta method {mc.method!r}")
    return out.astype(np.float32)


def _smallest(errs: np.ndarray, sizes: np.ndarray, rel_err: float | None, max_bytes: int | None) -> int:
    """Index into candidate truncations (errs decreasing with size) meeting the target."""
    if rel_err is not None:
        ok = np.nonzero(errs <= rel_err)[0]
        return int(ok[0]) if len(ok) else len(errs) - 1
    fit = np.nonzero(sizes <= max_bytes)[0] if max_bytes is not None else np.arange(len(sizes))
    return int(fit[-1]) if len(fit) else 0


def encode_meta(
    m: np.ndarray,
    method: str = "pca",
    rel_err: float | None = 1e-2,
    max_bytes: int | None = None,
    dtype: type = np.float16,
) -> MetaCode:
    """Compress M across rows; meet rel_err (or, if rel_err is None, the best fit within max_bytes)."""
    m = np.asarray(m, dtype=np.float64)
    rows, k = m.shape
    tot = max(_energy(m), 1e-300)
    isz = np.dtype(dtype).itemsize
    if method == "pca":
        mean = m.mean(axis=0)
        u, s, vt = np.linalg.svd(m - mean, full_matrices=False)
        resid = (np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])) / tot  # err with r comps
        r_all = np.arange(len(s) + 1)
        sizes = (k + rows * r_all + r_all * k) * isz
        r = int(r_all[_smallest(resid, sizes, rel_err, max_bytes)])
        arrays = {
            "mean": mean.astype(dtype),
            "coef": (u[:, :r] * s[:r]).astype(dtype),
            "basis": vt[:r].astype(dtype),
        }
    elif method == "dct":
        c = dct_basis(rows, rows).T @ m if rows <= 4096 else _dct_fft(m)
        e_rows = np.einsum("ij,ij->i", c, c)
        resid = np.concatenate([[tot], tot - np.cumsum(e_rows)]) / tot
        sizes = np.arange(rows + 1) * k * isz
        keep = _smallest(np.maximum(resid, 0), sizes, rel_err, max_bytes)
        arrays = {"coef": c[:keep].astype(dtype)}
    elif method == "haar":
        c = haar_forward(m).ravel()
        order = np.argsort(-np.abs(c), kind="stable")
        resid = np.concatenate([[tot], tot - np.cumsum(c[order] ** 2)]) / tot
        sizes = np.arange(len(c) + 1) * (4 + isz)
        n = _smallest(np.maximum(resid, 0), sizes, rel_err, max_bytes)
        idx = np.sort(order[:n]).astype(np.int32)
        arrays = {"index": idx, "value": c[idx].astype(dtype)}
    else:
        raise ValueError(f"unknown meta method {method!r}")
    return MetaCode(method, rows, k, arrays)


def _dct_fft(m: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II along axis 0 via FFT (Makhoul), for tall matrices."""
    n = m.shape[0]
    v = np.concatenate([m[0::2], m[1::2][::-1]], axis=0)
    f = np.fft.fft(v, axis=0)
    k = np.arange(n)[:, None]
    c = np.real(f * np.exp(-1j * np.pi * k / (2 * n))) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


def best_meta(
    m: np.ndarray, rel_err: float, methods: tuple[str, ...] = METHODS, dtype: type = np.float16
) -> MetaCode:
    """The method meeting rel_err (measured after rounding) with the fewest bytes."""
    m = np.asarray(m, dtype=np.float32)
    tot = max(_energy(m), 1e-300)
    best: MetaCode | None = None
    for meth in methods:
        mc = encode_meta(m, meth, rel_err=rel_err, dtype=dtype)
        err = _energy(decode_meta(mc) - m) / tot
        if err <= rel_err * 1.05 and (best is None or meta_nbytes(mc) < meta_nbytes(best)):
            best = mc
    return best if best is not None else encode_meta(m, "pca", rel_err=0.0, dtype=np.float32)
