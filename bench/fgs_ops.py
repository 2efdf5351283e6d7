"""Per-call time of the FGS reference products vs a dense f32 matmul on this machine (MLX CPU).

    python bench/fgs_ops.py [--reps N]

Shapes are SmolLM2 (576 -> 1536) and Gemma 3 270M (640 -> 2048) MLP projections; decode = 1 token,
prefill = 256 tokens. Gaussian: K = 16 bumps per row on the codec's default 10-width grid; circulant:
block 8; quant: 4-bit, group 64 (quantized_matmul and dequantize+GEMM both shown for the quant level).
"""

from __future__ import annotations

import argparse

# isort: off
import mmt_mlx  # noqa: F401  (first: it preloads pip's OpenBLAS, or MLX's matmul binds its reference BLAS)
import mlx.core as mx

# isort: on
import numpy as np

from mmt_mlx.bench.timing import best_ms
from mmt_mlx.fgs.runtime import ops

try:
    from mmt_mlx.fgs.encoders.gaussian import sigma_grid
except ImportError:  # the codec module is optional here
    sigma_grid = None


def _row(x: mx.array, w: mx.array, gauss: tuple, circ: tuple, quant: tuple, reps: int) -> None:
    t, cols = x.shape
    rows = w.shape[0]
    amp, mu, sidx, grid, perm, fidx = gauss
    sr, si, b = circ
    wq, sc, bi = quant
    dense = best_ms(lambda: x @ w.T, reps)
    g = best_ms(lambda: ops.gaussian_matmul(x, amp, mu, sidx, grid, perm, flat_index=fidx), reps)
    c = best_ms(lambda: ops.circulant_matmul(x, sr, si, rows, cols, b, freq_major=True), reps)
    q = best_ms(lambda: ops.quant_matmul(x, wq, sc, bi, 64, 4), reps)
    qmm_reps = max(1, reps // (10 if t > 1 else 1))  # ~2 GFLOP/s: keep the prefill rows short
    qmm = best_ms(lambda: mx.quantized_matmul(x, wq, sc, bi, transpose=True, group_size=64, bits=4), qmm_reps)
    old = ops._QMM_MAX_TOKENS_CPU
    ops._QMM_MAX_TOKENS_CPU = 0  # force the dequantize + GEMM path
    deq = best_ms(lambda: ops.quant_matmul(x, wq, sc, bi, 64, 4), reps)
    ops._QMM_MAX_TOKENS_CPU = old
    print(f"{rows:>8} x {cols:<6} {t:>6} {dense:9.3f} {g:10.3f} {c:9.3f} {q:9.3f} {qmm:9.3f} {deq:9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"MLX {mx.__version__}, device {mx.default_device()}; ms per call (best of 3 x {args.reps})")
    print(
        f"{'shape (out x in)':>17} {'tokens':>6} {'dense f32':>9} {'gauss K=' + str(args.k):>10} "
        f"{'circ b=8':>9} {'quant q4':>9} {'qmm':>9} {'deq+gemm':>9}"
    )
    for rows, cols in [(1536, 576), (2048, 640)]:
        grid = sigma_grid(cols) if sigma_grid else [0.5, 1, 2, 4, 8, 16, 32, 64]
        w = mx.array(rng.normal(size=(rows, cols)).astype(np.float32))
        amp = mx.array(rng.normal(size=(rows, args.k)).astype(np.float32))
        mu = mx.array(rng.integers(0, cols, (rows, args.k)).astype(np.int32))
        sidx = mx.array(rng.integers(0, len(grid), (rows, args.k)).astype(np.uint8))
        perm = mx.array(rng.permutation(cols).astype(np.int32))
        fidx = ops.gaussian_plan(tuple(float(s) for s in grid), cols).flat_index(mu, sidx)
        b = 8
        spec = np.fft.rfft(rng.normal(size=(rows // b, cols // b, b)), axis=-1)
        sr, si = ops.circulant_spectra(
            mx.array(spec.real.astype(np.float32)), mx.array(spec.imag.astype(np.float32))
        )
        sr, si = mx.contiguous(sr), mx.contiguous(si)
        wq, sc, bi = mx.quantize(w, group_size=64, bits=4)
        mx.eval(w, amp, mu, sidx, perm, fidx, sr, si, wq, sc, bi)
        for t in (1, 256):
            x = mx.array(rng.normal(size=(t, cols)).astype(np.float32))
            mx.eval(x)
            _row(x, w, (amp, mu, sidx, grid, perm, fidx), (sr, si, b), (wq, sc, bi), args.reps)
    print("per token: divide the 256-token rows by 256")


if __name__ == "__main__":
    main()
