"""Gaussian-matched codes in an FFT-rotated basis ("rotq" level), scalar or trellis-coded, with Hessian-aware
rounding.

RotQCode stores, for a (rows, cols) weight W and the rotation R of ``rotation.py`` (seed):
    Wr = W R^T  (what the codes hold),  Wr[i, j] = codebook[q[i, j]] * scales[i, j // g]
    W = Wr R, so  y = W x = Wr (R x): the runtime rotates its input once and multiplies by the codes.
``codebook`` holds the 2**bits Lloyd-Max levels of N(0, 1) (stored with the code, so a file never depends on
how this module computes them); q is packed as a little-endian bit stream (``quant.pack_bits``). Scales are f16,
or (``log_scales``) 8-bit codes on a log grid under a per-row f16 top (``codes.log_scale_values``): after the
rotation a row's group scales lie close to the row's RMS, so 1.1% steps over 4 octaves lose nothing measurable
while the scales cost half. Stored bits per weight: bits + 16 / g, or bits + 8 / g + 16 / cols
(+ the codebook, a few bytes per tensor).

Trellis codes (``trellis=True``, ``trellis.py``): the same layout and scales, but each code is read through a lut
of 4 x 2**bits levels at a state set by the codes of the two rows above it, chosen column by column by a
Viterbi search inside the GPTQ loop below.

Rounding: GPTQ/LDLQ error feedback in the rotated basis with the rotated input covariance R H R^T (damped),
each group's scale chosen at the group's start by a small search under diag(H) weights. Rows are independent
given H, so any subset of rows gives an unbiased estimate of the error (the planner screens on a sample; with
trellis codes the sample's rows form their own sequence, close enough for an estimate).
Pure numpy: knows nothing of models.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mmt_mlx.fgs.codes import LOG_SCALE_STEPS, RotQCode, log_scale_values
from mmt_mlx.fgs.encoders.lloyd_max import lloyd_max
from mmt_mlx.fgs.encoders.quant import pack_bits, unpack_bits
from mmt_mlx.fgs.encoders.rotation import rotate_covariance, rotate_weight, unrotate
from mmt_mlx.fgs.encoders.trellis import TRELLIS, tcq_codebook, tcq_quantize, trellis_states

CODE_BITS = (2, 3, 4, 5, 6)
# Scalar codes past the trellis' widest (TRELLIS_MAX_BITS): what a target above 6 bits per weight may buy (near the
# dense perplexity); the native integer kernels take 8-bit codebook codes, not 7.
WIDE_CODE_BITS = (8,)
TRELLIS_MAX_BITS = 6
CODE_GROUPS = (32, 64, 128)
SCALE_STEPS = np.linspace(0.85, 1.2, 6)  # multiples of the group's RMS tried as its scale
_ROW_BLOCK = 2048  # rows per pass of the rounding: bounds temporaries and stays cache-friendly
_COL_BLOCK = 128  # columns per lazy-update block of GPTQ


def rotq_nbytes(
    rows: int, cols: int, bits: int, group_size: int, log_scales: bool = False, trellis: bool = False
) -> int:
    """Stored bytes of a RotQCode: packed indices + scales (f16, or u8 codes + an f16 top per row) + codebook
    (2**bits f32 levels, or the trellis lut of 4 << bits)."""
    scales = rows * (cols // group_size) + 2 * rows if log_scales else rows * (cols // group_size) * 2
    lut = 4 if trellis and bits <= TRELLIS_MAX_BITS else 1  # wider codes are scalar (encode_rotq)
    return rows * (cols * bits // 32) * 4 + scales + (lut << bits) * 4


def rotq_code_nbytes(code: RotQCode) -> int:
    top = 0 if code.row_scale is None else code.row_scale.nbytes
    mask = 0 if code.row_mask is None else code.row_mask.nbytes
    return int(code.wq.nbytes + code.scales.nbytes + top + code.codebook.nbytes + mask)


def log_scale_top(wr: np.ndarray) -> np.ndarray:
    """The f16 top of each row's log-scale grid: 4x the row's RMS (group scales sit near 1x; the grid spans
    RMS / 4 to 4 RMS)."""
    rms = np.sqrt(np.mean(np.square(wr, dtype=np.float64), axis=1))
    top = (4 * rms).astype(np.float16)
    return np.where(np.isfinite(top) & (top > 0), top, np.float16(1.0))


def log_scale_codes(s: np.ndarray, top: np.ndarray) -> np.ndarray:
    """uint8 codes k of the grid points top * 2**(-k / LOG_SCALE_STEPS) nearest to scales ``s`` (rows, groups)."""
    t = np.asarray(top, np.float32)[:, None]
    ratio = np.maximum(np.asarray(s, np.float64), 1e-30) / t
    return np.clip(np.rint(-LOG_SCALE_STEPS * np.log2(ratio)), 0, 255).astype(np.uint8)


def _scale_rounder(top: np.ndarray | None):
    """How candidate scales (rows,) or (rows, groups) are rounded to what is stored: f16, or the log grid."""
    if top is None:
        return lambda s: np.asarray(s, np.float32).astype(np.float16).astype(np.float32)

    def snap(s: np.ndarray) -> np.ndarray:
        s2 = np.asarray(s).reshape(len(top), -1)
        return log_scale_values(log_scale_codes(s2, top), top).reshape(np.shape(s))

    return snap


def check_layout(cols: int, bits: int, group_size: int) -> None:
    if bits not in CODE_BITS + WIDE_CODE_BITS:
        raise ValueError(f"bits must be one of {CODE_BITS + WIDE_CODE_BITS}")
    if cols % group_size or (cols * bits) % 32 or cols % 8:
        raise ValueError(f"cols={cols} does not fit {bits}-bit codes in groups of {group_size}")


_LUT_STEP = 1.0 / 512  # nearest level through a table on a fine uniform grid: ~10x faster than a search


@lru_cache(maxsize=16)
def _lut(mids_key: tuple[float, ...]) -> tuple[np.ndarray, float]:
    mids = np.asarray(mids_key, np.float32)
    span = float(max(4.0, 1.5 * np.max(np.abs(mids)) + 1.0))
    grid = np.arange(-span, span + _LUT_STEP / 2, _LUT_STEP, dtype=np.float32)
    return np.searchsorted(mids, grid).astype(np.uint8), span


def _nearest(v: np.ndarray, mids: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook level (``mids`` = midpoints between sorted levels)."""
    table, span = _lut(tuple(float(m) for m in mids))
    i = np.rint((np.clip(v, -span, span) + span) * (1.0 / _LUT_STEP)).astype(np.int32)
    return table[i]


def _group_scales(wg: np.ndarray, weight: np.ndarray, cb: np.ndarray, mids: np.ndarray, rnd) -> np.ndarray:
    """wg (rows, g), weight (g,): per-row scale (stored rounding ``rnd``, as f32) of least weighted error over
    SCALE_STEPS x RMS."""
    rms = np.sqrt(np.mean(wg * wg, axis=1))
    rms = np.where(rms > 0, rms, 1.0)
    best_e = best_s = None
    for m in SCALE_STEPS:
        s = rnd(rms * m)
        s = np.where(s > 0, s, np.float32(1e-7))
        q = cb[_nearest(wg / s[:, None], mids)]
        d = wg - q * s[:, None]
        e = (d * d) @ weight
        if best_e is None:
            best_e, best_s = e, s
        else:
            better = e < best_e
            best_e, best_s = np.where(better, e, best_e), np.where(better, s, best_s)
    return best_s


def _inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (U^T U = H^-1), float32."""
    h = np.array(h, dtype=np.float64)
    d = np.diag(h)
    dead = d <= 0
    h[dead, dead] = 1.0
    mean = max(float(np.mean(np.diag(h))), 1e-12)
    h[np.diag_indices_from(h)] += damp * mean
    for extra in (0.0, 1e-2, 1e-1):  # more damping only if the factorization fails
        try:
            hh = h + extra * mean * np.eye(len(h))
            return np.linalg.cholesky(np.linalg.inv(hh)).T.astype(np.float32)
        except np.linalg.LinAlgError:
            continue
    raise ValueError("input covariance is not positive definite even after damping")


def _column_codes(
    x: np.ndarray, s: np.ndarray, mids: np.ndarray, lut: np.ndarray | None, bits: int
) -> np.ndarray:
    """Codes of one column's rows (x / s): nearest level, or with a trellis ``lut`` the Viterbi path from the
    top of the column. The path's error is counted in units of each row's scale, so no row's relative error is
    traded for another's, as with scalar codes; counted in weight units (weights s^2, what GPTQ's objective adds
    up) the output error fell a little further but SmolLM2's perplexity did not (27.50 against 27.01 at 4.0
    bits): rows of small scale lost to their neighbours."""
    if lut is None:
        return _nearest(x / s, mids)
    return tcq_quantize(x / s, np.ones_like(s), lut, bits)


def unit_values(
    q: np.ndarray, codebook: np.ndarray, bits: int, trellis: int, above: np.ndarray | None = None
):
    """Code values before scaling, (rows, cols) float32: codebook[q], or for trellis codes the lut at each
    code's state (``above``: the two rows before q's first, None at the top of the tensor)."""
    cb = np.asarray(codebook, np.float32)
    if not trellis:
        return cb[q]
    return cb[(trellis_states(q, above).astype(np.int32) << bits) | q]


def round_gptq(
    wr: np.ndarray,
    u: np.ndarray | None,
    hdiag: np.ndarray,
    bits: int,
    g: int,
    top: np.ndarray | None = None,
    trellis: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (rows, cols) uint8 and scales (rows, cols // g) f32 of rotated weights ``wr``.

    With ``u`` (the upper factor of H^-1) each column's rounding error is fed back into the columns not yet
    rounded (GPTQ's lazy block update); without it the rounding is plain nearest-level. Scales are rounded to
    f16, or with ``top`` (rows,) to its log grid. ``trellis``: each column is one trellis sequence down the
    rows (``trellis.py``); scales are still chosen by the Lloyd-Max proxy, then re-solved by the caller."""
    cb = lloyd_max(bits)
    mids = (cb[1:] + cb[:-1]) / 2
    lut = tcq_codebook(bits) if trellis else None
    rows, cols = wr.shape
    q_all = np.empty((rows, cols), np.uint8)
    s_all = np.empty((rows, cols // g), np.float32)
    hdiag = np.asarray(hdiag, np.float32)
    # a trellis runs down whole columns in one block: a row block's first codes would start from a state fixed
    # in advance, where the trained levels fit badly (measured: twice the error on those rows)
    block = rows if trellis else _ROW_BLOCK
    for a in range(0, rows, block):
        w = np.array(wr[a : a + block], dtype=np.float32)
        n = w.shape[0]
        rnd = _scale_rounder(None if top is None else top[a : a + n])
        if u is None:
            for k in range(cols // g):
                sl = slice(k * g, (k + 1) * g)
                s = _group_scales(w[:, sl], hdiag[sl], cb, mids, rnd)
                s_all[a : a + n, k] = s
                if lut is None:
                    q_all[a : a + n, sl] = _nearest(w[:, sl] / s[:, None], mids)
                    continue
                for j in range(sl.start, sl.stop):
                    q_all[a : a + n, j] = _column_codes(w[:, j], s, mids, lut, bits)
            continue
        s = None
        vals = cb if lut is None else lut
        for i1 in range(0, cols, _COL_BLOCK):
            i2 = min(i1 + _COL_BLOCK, cols)
            err = np.empty((n, i2 - i1), np.float32)
            for j in range(i1, i2):
                if j % g == 0:
                    s = _group_scales(w[:, j : j + g], hdiag[j : j + g], cb, mids, rnd)
                    s_all[a : a + n, j // g] = s
                x = w[:, j]
                qi = _column_codes(x, s, mids, lut, bits)
                q_all[a : a + n, j] = qi
                if lut is not None:  # the lut index of each code: its state, then the code
                    qi = (trellis_states(qi[:, None])[:, 0].astype(np.int32) << bits) | qi
                e = (x - vals[qi] * s) / u[j, j]
                if j + 1 < i2:
                    w[:, j + 1 : i2] -= np.outer(e, u[j, j + 1 : i2])
                err[:, j - i1] = e
            if i2 < cols:
                w[:, i2:] -= err @ u[i1:i2, i2:]
    return q_all, s_all


def encode_rotq(
    w: np.ndarray,
    bits: int,
    group_size: int,
    seed: int,
    h: np.ndarray | None = None,
    *,
    damp: float = 0.01,
    rotated_h: bool = False,
    factor: np.ndarray | None = None,
    refit: bool = True,
    log_scales: bool = False,
    trellis: bool = False,
) -> RotQCode:
    """Encode W (rows, cols) with input covariance H (cols, cols) (None: plain rounding, no error feedback).

    ``rotated_h``: H is already R H R^T; ``factor``: a precomputed ``inverse_factor`` of the rotated H
    (layers that share an input share it); ``refit``: re-solve the group scales for the codes chosen
    (``refit_scales``); ``log_scales``: 8-bit log-scale codes under a per-row top instead of f16 scales;
    ``trellis``: trellis-coded (``trellis.py``) instead of scalar Lloyd-Max codes, up to TRELLIS_MAX_BITS (wider
    codes are scalar)."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    check_layout(cols, bits, group_size)
    trellis = trellis and bits <= TRELLIS_MAX_BITS
    wr = rotate_weight(w, seed)
    hr = None
    if h is not None:
        hr = np.asarray(h, np.float64) if rotated_h else rotate_covariance(np.asarray(h, np.float64), seed)
    u = factor if factor is not None else (None if hr is None else inverse_factor(hr, damp))
    hdiag = np.ones(cols, np.float32) if hr is None else np.diag(hr).astype(np.float32)
    top = log_scale_top(wr) if log_scales else None
    q, s = round_gptq(wr, u, hdiag, bits, group_size, top, trellis)
    cb = (tcq_codebook(bits) if trellis else lloyd_max(bits)).copy()
    if hr is not None and refit:
        s = refit_scales(wr, hr, unit_values(q, cb, bits, TRELLIS if trellis else 0), s, group_size, top)
    stored = s.astype(np.float16) if top is None else log_scale_codes(s, top)
    return RotQCode(rows, cols, bits, group_size, int(seed), cb, pack_bits(q, bits), stored, top,
                    TRELLIS if trellis else 0)  # fmt: skip


def row_errors(w: np.ndarray, v: np.ndarray, scales: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row (w - w_hat) H (w - w_hat)^T with w_hat = code values ``v`` times their group's scale."""
    n, cols = v.shape
    ng = scales.shape[1]
    d = w - (v.reshape(n, ng, cols // ng) * scales[:, :, None]).reshape(n, cols)
    return ((d @ h) * d).sum(1)


def refit_scales(
    wr: np.ndarray, hr: np.ndarray, v: np.ndarray, s: np.ndarray, g: int, top: np.ndarray | None = None
) -> np.ndarray:
    """Group scales that minimize each row's output error (w - w_hat) H (w - w_hat)^T for fixed code values
    ``v`` = codebook[q] (rows, cols): per row the (groups x groups) system (C^T H C) s = C^T H w, C holding
    the row's code values group by group. GPTQ chose each scale before its group's error feedback; the
    joint solve is the least-squares optimum for the codes it chose. A row keeps its old scales where the
    new ones (rounded as stored: f16, or with ``top`` to its log grid) are not better."""
    rows, cols = wr.shape
    ng = cols // g
    h = np.asarray(hr, np.float64)
    hb = h.reshape(cols, ng, g)
    out = np.array(s, np.float32)
    for a in range(0, rows, 256):
        w = np.asarray(wr[a : a + 256], np.float64)
        vb = np.asarray(v[a : a + 256], np.float64)
        n = w.shape[0]
        p = np.einsum("ibj,nbj->nib", hb, vb.reshape(n, ng, g))  # (n, cols, ng): H C per row
        amat = np.einsum("nai,naib->nab", vb.reshape(n, ng, g), p.reshape(n, ng, g, ng))
        rhs = ((w @ h) * vb).reshape(n, ng, g).sum(-1)
        amat += np.eye(ng) * (1e-9 * np.trace(amat, axis1=1, axis2=2) / ng + 1e-30)[:, None, None]
        try:
            new = np.linalg.solve(amat, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            continue
        rnd = _scale_rounder(None if top is None else top[a : a + n])
        new = rnd(np.where(np.isfinite(new), new, 0)).astype(np.float64)
        old = rnd(out[a : a + n]).astype(np.float64)
        better = (row_errors(w, vb, new, h) < row_errors(w, vb, old, h)) & np.all(new > 0, axis=1)
        out[a : a + n] = np.where(better[:, None], new, old)
    return out


def inverse_factor(hr: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """The GPTQ factor of a rotated covariance (see ``encode_rotq``'s ``factor``)."""
    return _inverse_factor(hr, damp)


def decode_rotated(code: RotQCode, rows: slice | None = None) -> np.ndarray:
    """Wr (or a row slice of it), float32: codebook[q] * scale."""
    sl = rows if rows is not None else slice(0, code.rows)
    q = unpack_bits(code.wq[sl], code.bits, code.cols)
    a = sl.start or 0
    above = unpack_bits(code.wq[max(0, a - 2) : a], code.bits, code.cols) if code.trellis and a > 0 else None
    if above is not None and len(above) == 1:
        above = np.concatenate([np.zeros_like(above), above])
    n, g = q.shape[0], code.group_size
    v = unit_values(q, code.codebook, code.bits, code.trellis, above).reshape(n, code.cols // g, g)
    v *= code.group_scales(sl)[:, :, None]
    return v.reshape(n, code.cols)


def decode_rotq(code: RotQCode, rows: slice | None = None) -> np.ndarray:
    """W (or a row slice of it), float32: Wr R, i.e. every row un-rotated."""
    return unrotate(decode_rotated(code, rows), code.seed)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray | None) -> float:
    """Relative output error tr(D H D^T) / tr(W H W^T), D = W - W_hat (plain Frobenius when H is None)."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    w = np.asarray(w, np.float64)
    if h is None:
        return float((d * d).sum() / max((w * w).sum(), 1e-300))
    return float(((d @ h) * d).sum() / max(((w @ h) * w).sum(), 1e-300))
