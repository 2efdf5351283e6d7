"""One-token products on the native kernels, affine (the default presets) and codebook (the rotq presets: scalar
and trellis codes, whose lut holds 4 x 2^bits levels), at SmolLM2's shapes, on 1 and 2 threads: microseconds per product, the best of 7 rounds of 20 products evaluated
together (so MLX's per-node overhead is shared out, as in a decode graph).

    python bench/one_token_products.py [--threads 1,2]

Random codes and scales: the speed does not depend on their values. Comparing two builds of the extension means
running this once with each (alternating, on a host whose speed drifts).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

# isort: off
import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

# isort: on
import numpy as np

from mmt_mlx import native

SHAPES = ((1536, 576, 4), (576, 1536, 5), (49152, 576, 3))  # an MLP projection, the down projection, the head


def best_us(fn, rounds: int = 7, per_round: int = 20) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(per_round)])
        best = min(best, (time.perf_counter() - t0) / per_round)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    if not native.enabled():
        raise SystemExit("the native kernels are not in use here (mmt info says why)")
    rng = np.random.default_rng(0)
    for threads in (int(t) for t in args.threads.split(",")):
        native.set_threads(threads)
        cells = []
        for rows, cols, bits in SHAPES:
            wq = mx.array(rng.integers(0, 2**32, size=(rows, cols * bits // 32), dtype=np.uint32))
            s = mx.array(rng.uniform(0.5, 1, size=(rows, cols // 64)).astype(np.float16))
            b = mx.array(rng.uniform(-1, 1, size=(rows, cols // 64)).astype(np.float16))
            levels = mx.array(np.sort(rng.normal(size=2**bits)).astype(np.float32))
            lut = mx.array(rng.normal(size=4 * 2**bits).astype(np.float32))
            x = mx.array(rng.normal(size=(1, cols)).astype(np.float32))
            aff = best_us(partial(native.quant_matmul, x, wq, s, b, 64, bits))
            cb = best_us(partial(native.codebook_matmul, x, wq, s, levels, 64, bits))
            tcq = best_us(partial(native.codebook_matmul, x, wq, s, lut, 64, bits))
            cells.append(
                f"{rows}x{cols} {bits}-bit: affine {aff:.0f} us, codebook {cb:.0f}, trellis {tcq:.0f}"
            )
        print(f"{threads} thread(s): " + " | ".join(cells))
    native.set_threads(0)


if __name__ == "__main__":
    main()
