"""Per-level R^2 and stored bytes of the FGS codecs on real tensors of SmolLM2-135M and Gemma 3 270M.

R^2 = 1 - |W - W_hat|^2 / |W|^2 of each level fitted alone to W; bytes = every stored array. Then the
planner's choice at a few tau. Run: python bench/codec_levels.py [--fast]
"""

from __future__ import annotations

import argparse
import os
import time

import gguf
import numpy as np
from gguf.quants import dequantize

import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
from mmt_mlx.fgs.codec import code_nbytes, decode_level, decode_tensor
from mmt_mlx.fgs.encoders import quant as Q
from mmt_mlx.fgs.encoders.circulant import fit_circulant
from mmt_mlx.fgs.encoders.gaussian import column_order, fit_gaussian, gaussian_amp
from mmt_mlx.fgs.encoders.meta import encode_meta
from mmt_mlx.fgs.encoders.planner import plan_tensor
from mmt_mlx.registry import builtin_path


def smollm2_path() -> str:
    return str(builtin_path("smollm2-135m-instruct"))


def gemma_path() -> str:
    return str(builtin_path("gemma3-270m"))


def load(path: str, names: list[str]) -> dict[str, tuple[np.ndarray, str]]:
    r = gguf.GGUFReader(path)
    return {
        t.name: (dequantize(t.data, t.tensor_type).astype(np.float32), t.tensor_type.name)
        for t in r.tensors
        if t.name in names
    }


def r2(w: np.ndarray, w_hat: np.ndarray) -> float:
    d = (w - w_hat).astype(np.float64)
    return 1.0 - float((d * d).sum() / (w.astype(np.float64) ** 2).sum())


def row(name: str, rr: float, nbytes: int, dense: int, secs: float) -> None:
    print(
        f"  {name:<28s} R2={rr:8.4f}  bytes={nbytes:>11,d}  ({8 * nbytes / dense:6.3f} bits/w)  {secs:6.2f}s"
    )


def bench_tensor(name: str, w: np.ndarray, src: str, big: bool) -> None:
    rows, cols = w.shape
    n = rows * cols
    print(f"{name} {rows}x{cols} (source {src})")
    for b, g in [(8, 32), (4, 32), (4, 64), (3, 64), (2, 64)]:
        t = time.time()
        c = Q.quantize(w, b, g)
        row(f"quant {b}b g{g}", r2(w, Q.dequantize(c)), code_nbytes(c), n, time.time() - t)
    if big:  # structured levels on the 262144-row embedding: a 4096-row sample (all are row-separable)
        w = w[np.random.default_rng(0).choice(rows, 4096, replace=False)]
        rows, n = w.shape[0], w.size
        print(f"  (structured levels on a {rows}-row sample)")
    perm = column_order(w)
    for k in sorted({8, cols // 16}):
        for p in (None, perm):
            t = time.time()
            c = fit_gaussian(w, k, perm=p)
            dt = time.time() - t
            row(
                f"gaussian K={k}{' perm' if p is not None else ''}",
                r2(w, decode_level(c)),
                code_nbytes(c),
                n,
                dt,
            )
        for me in (0.02, 0.2):
            amp = gaussian_amp(c)
            c.amp = encode_meta(amp, "pca", rel_err=me)
            row(f"  + pca amps (err {me})", r2(w, decode_level(c)), code_nbytes(c), n, 0.0)
    for b in (4, 8, 16):
        t = time.time()
        c = fit_circulant(w, b)
        row(f"circulant b={b} (f16 spectra)", r2(w, decode_level(c)), code_nbytes(c), n, time.time() - t)


def bench_planner(name: str, w: np.ndarray, taus: list[float]) -> None:
    for tau in taus:
        t = time.time()
        tc = plan_tensor(w, tau)
        dt = time.time() - t
        nb = sum(code_nbytes(lv) for lv in tc.levels)
        lv = " + ".join(
            f"{x.kind}({x.bits}b g{x.group_size})" if x.kind == "quant" else x.kind for x in tc.levels
        )
        err = 1 - r2(w, decode_tensor(tc))
        print(
            f"  plan tau={tau:g}: {lv:<36s} err={err:.2e} bytes={nb:>11,d} "
            f"({8 * nb / w.size:.3f} bits/w) {dt:.2f}s"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="skip the Gemma embedding table")
    args = ap.parse_args()
    taus = [3e-2, 1e-2, 1e-3, 1e-5]
    smol = ["blk.0.attn_q.weight", "blk.15.ffn_down.weight", "blk.29.ffn_gate.weight"]
    gem = ["blk.6.attn_q.weight", "blk.6.ffn_down.weight"] + ([] if args.fast else ["token_embd.weight"])
    for path, names in ((smollm2_path(), smol), (gemma_path(), gem)):
        print(f"== {os.path.basename(path)}")
        for name, (w, src) in load(path, names).items():
            bench_tensor(name, w, src, big=w.shape[0] > 100_000)
            bench_planner(name, w, taus)
            print()


if __name__ == "__main__":
    main()
