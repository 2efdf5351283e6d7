"""Below 4 bits: how the rounding grid of the quant level decides quality (the next step for the planner).

Every 2-D weight of a model is quantized at one uniform bits/group with each method, and the perplexity of
the resulting dense model is measured on the Alice text:
  rtn    min/max grid (what the FGS quant level does today; exact on Q4_1 sources)
  clip   per group, the shrink of [min, max] (11 steps, 1.0 to 0.5) with the least activation-weighted error
  gptq   GPTQ error feedback with the calibration inputs' covariance H (min/max grid at each group start)
  gptqc  GPTQ with the clip grid
Calibration is the same shipped text and length as `mmt convert`. Slow: one dense f32 perplexity run per method.

Run: python bench/quant_grid.py -m smollm2-135m-instruct --methods rtn,clip,gptq,gptqc --bits 3 --group 64
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
from mmt_mlx.build import model_from_source
from mmt_mlx.convert import CALIBRATION_TOKENS, calibration_text
from mmt_mlx.evals.text import read_text
from mmt_mlx.fgs.encoders import quant as Q
from mmt_mlx.locate import load_source
from mmt_mlx.perplexity import perplexity
from mmt_mlx.sources import SourceModel

SHRINKS = np.linspace(1.0, 0.5, 11)


class _CovRecorder(nn.Module):
    """Accumulates X^T X of a Linear's (or the tied head's) inputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.H, self.n = inner, None, 0

    def _record(self, x: mx.array) -> None:
        f = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        h = f.T @ f
        self.H = h if self.H is None else self.H + h
        self.n += f.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        if not isinstance(self.inner, nn.Embedding):
            self._record(x)
        return self.inner(x)

    def as_linear(self, x: mx.array) -> mx.array:
        self._record(x)
        return self.inner.as_linear(x)


def input_covariances(src: SourceModel, name: str) -> dict[str, np.ndarray]:
    lm = model_from_source(src, name)
    ids = lm.tokenizer.encode(calibration_text(), add_bos=True)[:CALIBRATION_TOKENS]
    mods = [(n, m) for n, m in lm.model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    recs = {n: _CovRecorder(m) for n, m in mods}
    lm.model.update_modules(tree_unflatten(list(recs.items())))
    for s in range(0, len(ids), 512):
        lm.model(mx.array(ids[s : s + 512])[None], lm.model.make_cache())
        mx.eval([r.H for r in recs.values() if r.H is not None])
    return {
        f"{n}.weight": np.asarray(r.H, dtype=np.float64) / r.n for n, r in recs.items() if r.H is not None
    }


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _apply(wg: np.ndarray, sc: np.ndarray, b: np.ndarray, nq: int) -> np.ndarray:
    q = np.clip(np.rint((wg - b[..., None]) / np.where(sc == 0, 1, sc)[..., None]), 0, nq)
    return q * sc[..., None] + b[..., None]


def grid(wg: np.ndarray, weight: np.ndarray, nq: int, shrinks=SHRINKS) -> tuple[np.ndarray, np.ndarray]:
    """wg (rows, groups, g), weight (groups, g): per-group (scale, bias) of least weighted squared error."""
    lo, hi = wg.min(2), wg.max(2)
    best_e = best_s = best_b = None
    for s in shrinks:
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * s
        sc, b = _f16(2 * half / nq), _f16(mid - half)
        d = wg - _apply(wg, sc, b, nq)
        e = (d * d * weight[None]).sum(2)
        if best_e is None:
            best_e, best_s, best_b = e, sc, b
        else:
            m = e < best_e
            best_e, best_s, best_b = np.where(m, e, best_e), np.where(m, sc, best_s), np.where(m, b, best_b)
    return best_s, best_b


def rtn(w: np.ndarray, H, bits: int, g: int) -> np.ndarray:
    return Q.dequantize(Q.quantize(w, bits, g))


def clip(w: np.ndarray, H, bits: int, g: int) -> np.ndarray:
    rows, cols = w.shape
    nq = (1 << bits) - 1
    d = np.diag(H).astype(np.float32) if H is not None else np.ones(cols, np.float32)
    out = np.empty_like(w)
    for a in range(0, rows, 4096):
        wg = w[a : a + 4096].reshape(-1, cols // g, g)
        sc, b = grid(wg, d.reshape(cols // g, g), nq)
        out[a : a + 4096] = _apply(wg, sc, b, nq).reshape(-1, cols)
    return out


def gptq(w: np.ndarray, H, bits: int, g: int, use_clip: bool = False, blk: int = 128, damp: float = 0.01):
    if H is None:
        return clip(w, H, bits, g) if use_clip else rtn(w, H, bits, g)
    rows, cols = w.shape
    nq = (1 << bits) - 1
    H = H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    H += damp * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)  # upper factor of H^-1
    dH = np.diag(H).astype(np.float32)
    W, out = w.astype(np.float32).copy(), np.zeros_like(w, dtype=np.float32)
    for i1 in range(0, cols, blk):
        i2 = min(i1 + blk, cols)
        err = np.zeros((rows, i2 - i1), np.float32)
        for j in range(i1, i2):
            if j % g == 0:
                wg = W[:, j : j + g][:, None, :]
                if use_clip:
                    sc, b = grid(wg, dH[j : j + g][None], nq)
                else:
                    lo, hi = wg.min(2), wg.max(2)
                    sc, b = _f16((hi - lo) / nq), _f16(lo)
                sc, b = sc[:, 0], b[:, 0]
            x = W[:, j]
            q = _apply(x[:, None], sc[:, None], b[:, None], nq)[:, 0]
            out[:, j] = q
            e = (x - q) / U[j, j]
            W[:, j:i2] -= np.outer(e, U[j, j:i2])
            err[:, j - i1] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return out


METHODS = {
    "rtn": rtn,
    "clip": clip,
    "gptq": gptq,
    "gptqc": lambda w, H, b, g: gptq(w, H, b, g, use_clip=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", default="rtn,clip,gptq,gptqc")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    name, src = load_source(a.model)
    ids = src.tokenizer.encode(read_text("tests/fixtures/alice29.txt", "Alice was beginning"), add_bos=False)
    covs = input_covariances(src, name)
    rows = []
    for meth in a.methods.split(","):
        t0 = time.perf_counter()
        fake, herr = {}, []
        for k, v in src.weights.items():
            if v.ndim != 2:
                fake[k] = v
                continue
            H = covs.get(k)
            fake[k] = METHODS[meth](v, H, a.bits, a.group)
            if H is not None:  # relative W x error on the first rows
                d, w0 = (v - fake[k])[:2048].astype(np.float64), v[:2048].astype(np.float64)
                herr.append(float(((d @ H) * d).sum() / ((w0 @ H) * w0).sum()))
        t_q = time.perf_counter() - t0
        lm = model_from_source(SourceModel(src.arch, src.config, fake, src.tokenizer, src.path,
                                           src.weight_bytes, src.meta), name)  # fmt: skip
        r = perplexity(lm.model, ids, src.tokenizer.bos_id, ctx=512, chunks=a.chunks)
        row = {"method": meth, "bits": a.bits, "group": a.group, "ppl": r.ppl, "tokens": r.tokens,
               "mean_rel_wx_error": float(np.mean(herr)), "quantize_seconds": round(t_q, 1)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row) if a.json else
              f"{meth:<6} q{a.bits}g{a.group}: ppl {r.ppl:9.3f}  rel Wx err {row['mean_rel_wx_error']:.4g}  "
              f"quantize {t_q:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
