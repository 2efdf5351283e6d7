"""Choose the levels of one tensor's code: meet relative error tau with the fewest stored bytes.

error = ||(W - W_hat) * w||_F^2 / ||W * w||_F^2, w = col_weight (all ones when None).
Each level fits the residual the previous levels leave (as decoded, after their f16 rounding). The last
level is always group-affine quantization at the cheapest bits/group that meets tau; if even 8-bit g32
does not, a further quant level takes the remaining residual (up to ``max_quant_levels``).

Speed: candidates are screened on a row sample (every level here is row-separable: Gaussian rows,
circulant tile-rows, quant groups, so a sample gives unbiased per-row errors and exact per-row bytes).
A structured level is only fitted at all if its bytes leave room for a saving, and Gaussian levels are
pre-screened with the pursuit's own R^2(K) curve. Only the winner is built on the full matrix.
"""

from __future__ import annotations

import numpy as np

from mmt_mlx.fgs.codec import code_nbytes, decode_level
from mmt_mlx.fgs.codes import Level, TensorCode
from mmt_mlx.fgs.encoders import quant as Q
from mmt_mlx.fgs.encoders.circulant import decode_circulant, fit_circulant
from mmt_mlx.fgs.encoders.gaussian import (
    column_order,
    fit_gaussian,
    gaussian_amp,
    pursuit_gain,
)
from mmt_mlx.fgs.encoders.meta import encode_meta

KINDS = frozenset({"quant", "gaussian", "circulant", "meta"})
_MARGIN = 0.9  # a sampled estimate must land this far under tau before the full check


def _wsq(d: np.ndarray, w: np.ndarray | None) -> float:
    if w is not None:
        d = d * w[None, :]
    return float(np.einsum("ij,ij->", d, d, dtype=np.float64))


def quant_configs(rows: int, cols: int, bits=Q.SUPPORTED_BITS, groups=Q.SUPPORTED_GROUPS) -> list[tuple]:
    """(bits, group) pairs valid for this width, cheapest first."""
    cfg = [(b, g) for b in bits for g in groups if cols % g == 0 and (cols * b) % 32 == 0 and cols % 8 == 0]
    return sorted(cfg, key=lambda c: (Q.quant_nbytes(rows, cols, *c), -c[0]))


class _Screen:
    """Row-sample estimates of the quant overflow for a given residual (lazy, cheapest config first)."""

    def __init__(
        self,
        rows: int,
        cols: int,
        configs: list[tuple],
        w: np.ndarray | None,
        den: float,
        search: bool = False,
    ):
        self.rows, self.cols, self.configs, self.w, self.den = rows, cols, configs, w, den
        self.search = search

    def errors(self, res: np.ndarray) -> list[float]:
        return [Q.quant_error_sq(res, b, g, self.w, self.search) / self.den for b, g in self.configs]

    def cheapest(self, res: np.ndarray, budget: float, depth: int = 3) -> tuple[tuple | None, int]:
        """Cheapest config whose sampled error <= budget, and the full-matrix bytes of the overflow."""
        for b, g in self.configs:
            if Q.quant_error_sq(res, b, g, self.w, self.search) / self.den <= budget:
                return (b, g), Q.quant_nbytes(self.rows, self.cols, b, g)
        # nothing reaches tau in one level: the best config, then more levels on what it leaves
        b, g = self.configs[-1]
        nb = Q.quant_nbytes(self.rows, self.cols, b, g)
        if depth <= 1:
            return None, 2 * nb
        rest = res - Q.dequantize(Q.quantize(res, b, g, self.w, self.search))
        return None, nb + self.cheapest(rest, budget, depth - 1)[1]


def _sample(rows: int, n: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: whole blocks of ``block`` rows (so circulant tile-rows stay intact)."""
    nb = -(-rows // block)
    take = min(nb, max(1, n // block))
    blocks = np.sort(rng.choice(nb, size=take, replace=False)) if take < nb else np.arange(nb)
    idx = (blocks[:, None] * block + np.arange(block)[None, :]).ravel()
    return idx[idx < rows]


def _build_structured(kind: str, param: dict, w: np.ndarray, cw: np.ndarray | None) -> Level:
    if kind == "circulant":
        return fit_circulant(w, param["block"], cw)
    code = fit_gaussian(w, param["k"], perm=param.get("perm"), col_weight=cw)
    if kind == "meta":
        code.amp = encode_meta(gaussian_amp(code), "pca", rel_err=param["meta_err"])
    return code


def plan_tensor(
    W: np.ndarray,
    tau: float,
    col_weight: np.ndarray | None = None,
    allowed: set[str] | frozenset[str] = KINDS,
    *,
    bits: tuple[int, ...] = Q.SUPPORTED_BITS,
    groups: tuple[int, ...] = Q.SUPPORTED_GROUPS,
    sample_rows: int = 512,
    gaussian_k: tuple[int, ...] | None = None,
    circ_blocks: tuple[int, ...] = (4, 8, 16, 32),
    meta_errs: tuple[float, ...] = (0.02, 0.1),
    max_quant_levels: int = 4,
    seed: int = 0,
    grid_search: bool = False,
) -> TensorCode:
    """Levels for W meeting error <= tau (weighted by col_weight) with the fewest bytes found.

    ``grid_search``: quant levels search each group's grid (see ``quant``) instead of taking min/max."""
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError("plan_tensor takes a 2-D matrix")
    rows, cols = W.shape
    allowed = frozenset(allowed) & KINDS
    cw = None if col_weight is None else np.asarray(col_weight, dtype=np.float32)
    configs = quant_configs(rows, cols, bits, groups)
    if not configs:
        raise ValueError(f"no quant layout fits cols={cols} (needs a multiple of 32 and of a group size)")
    den_full = _wsq(W, cw)
    tc = TensorCode((rows, cols), [], [], tau)
    if den_full == 0.0:
        return tc  # an all-zero (or all-masked) tensor needs no levels

    # ---- screening on a row sample ----
    rng = np.random.default_rng(seed)
    blk = max([b for b in circ_blocks if b <= rows] + [1]) if "circulant" in allowed else 1
    idx = _sample(rows, sample_rows, blk, rng)
    exact = len(idx) == rows
    Ws = W[idx]
    scr = _Screen(rows, cols, configs, cw, max(_wsq(Ws, cw), 1e-300), grid_search)
    budget = tau if exact else tau * _MARGIN
    _, best_bytes = scr.cheapest(Ws, budget)
    best: tuple[str, dict] = ("quant", {})
    floor_bytes = Q.quant_nbytes(rows, cols, *configs[0])  # no overflow level can be cheaper
    room = best_bytes - floor_bytes  # the most a structured level could ever save

    if {"gaussian", "meta"} & allowed and room > 0:
        ks = gaussian_k or tuple(sorted({max(1, cols // 64), max(1, cols // 32), max(1, cols // 16)}))
        # bytes per bump: amp f16 + mu u16 + sidx u8 (meta can only shrink the 2 amp bytes)
        min_bpb = 3 if "meta" in allowed else 5
        ks = [k for k in ks if rows * k * min_bpb < room]
        if ks:
            pre = Ws[: min(64, len(Ws))]
            r2 = pursuit_gain(pre * cw[None, :] if cw is not None else pre, max(ks))
            qerr = scr.errors(Ws)  # quant error of W itself, config by config
            perm: np.ndarray | None = None
            kinds = [x for x in ("gaussian", "meta") if x in allowed]
            for k in ks:
                # optimistic: quant error shrinks in proportion to the energy the bumps removed
                ok = [c for c, e in zip(configs, qerr) if e * (1 - r2[k - 1]) <= budget]
                guess = rows * k * min_bpb + (Q.quant_nbytes(rows, cols, *ok[0]) if ok else best_bytes)
                if guess >= best_bytes:
                    continue
                if perm is None and "gaussian" in allowed:
                    perm = column_order(W)  # only now: it costs a few passes over W
                for kind in kinds:
                    for me in meta_errs if kind == "meta" else (None,):
                        p = {"k": k, "perm": perm, "meta_err": me}
                        # realistic check on the small pre-sample first, the full sample only if it wins
                        for sub in (pre, Ws):
                            lv = _build_structured(kind, p, sub, cw)
                            sc = _Screen(rows, cols, configs, cw, max(_wsq(sub, cw), 1e-300), grid_search)
                            _, qb = sc.cheapest(sub - decode_level(lv), budget)
                            fixed = perm.nbytes if perm is not None else 0  # perm does not scale with rows
                            total = int((code_nbytes(lv) - fixed) * rows / len(sub) + fixed + qb)
                            if total >= best_bytes:
                                break
                        else:
                            best, best_bytes = (kind, p), total

    if "circulant" in allowed and room > 0:
        for b in circ_blocks:
            nbytes = (-(-rows // b)) * (-(-cols // b)) * (b // 2 + 1) * 4  # f16 re + im
            if b > rows or nbytes >= room:
                continue
            lv = fit_circulant(Ws, b, cw)
            _, qb = scr.cheapest(Ws - decode_circulant(lv), budget)
            if nbytes + qb < best_bytes:
                best, best_bytes = ("circulant", {"block": b}), nbytes + qb

    # ---- full build of the winner ----
    res = W.copy()
    if best[0] != "quant":
        lv = _build_structured(best[0], best[1], W, cw)
        res -= decode_level(lv)
        tc.levels.append(lv)
        tc.errors.append(_wsq(res, cw) / den_full)
    _overflow(tc, res, tau, cw, den_full, configs, scr, idx, exact, max_quant_levels)
    return tc


def _overflow(
    tc: TensorCode,
    res: np.ndarray,
    tau: float,
    cw,
    den_full: float,
    configs,
    scr: _Screen,
    idx: np.ndarray,
    exact: bool,
    max_levels: int,
) -> None:
    """Append quant levels to tc until error <= tau (cheapest verified config each time)."""
    budget = tau if exact else tau * _MARGIN
    for _ in range(max_levels):
        prev = _wsq(res, cw) / den_full
        if prev <= tau:
            return
        # skip the configs the sample already rules out (no packing needed for that)
        sub = res if exact else res[idx]
        start = len(configs) - 1
        for i, (b, g) in enumerate(configs):
            if Q.quant_error_sq(sub, b, g, cw, scr.search) / scr.den <= budget:
                start = i
                break
        chosen = None
        for b, g in configs[start:]:
            code = Q.quantize(res, b, g, cw, scr.search)
            new = res - Q.dequantize(code)
            err = _wsq(new, cw) / den_full
            chosen = (code, new, err)
            if err <= tau:
                break
        code, new, err = chosen
        if err >= prev:  # f16 grid exhausted: more levels cannot help
            return
        tc.levels.append(code)
        tc.errors.append(err)
        res[...] = new
