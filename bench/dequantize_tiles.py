"""A long prompt's tile decode: MLX's CPU ``dequantize`` against the native ``affine_dequantize`` node, beside the
f32 GEMM the tile feeds (256 tokens), per code width, on one 2048 x 640 tile (Gemma 3 270M's MLP shape).

    python bench/dequantize_tiles.py [--reps N] [--json]
"""

from __future__ import annotations

import argparse
import json

# isort: off
import mmt_mlx  # noqa: F401  (first: it preloads pip's OpenBLAS, or MLX's matmul binds its reference BLAS)
import mlx.core as mx

# isort: on
from mmt_mlx import native
from mmt_mlx.bench.timing import best_ms

WIDTHS = [(2, 64), (3, 64), (4, 32), (5, 32), (6, 128), (8, 32)]


def _width(x: mx.array, bits: int, group: int, reps: int) -> dict:
    w = mx.random.normal((2048, 640))
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    s16, b16 = s.astype(mx.float16), b.astype(mx.float16)
    mx.eval(x, w, wq, s, b, s16, b16)
    return {
        "bits": bits, "group": group,
        "mlx_dequantize_ms": round(best_ms(lambda: mx.dequantize(wq, s, b, group_size=group, bits=bits), reps), 3),
        "native_dequantize_ms": round(best_ms(lambda: native.dequantize(wq, s16, b16, group, bits), reps), 3),
        "gemm_256_tokens_ms": round(best_ms(lambda: x @ w.T, reps), 3),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not native.available():
        raise SystemExit(f"the native CPU kernels are not built: {native.describe()}")
    x = mx.random.normal((256, 640))
    rows = [_width(x, bits, group, a.reps) for bits, group in WIDTHS]
    if a.json:
        print(json.dumps(rows))
        return
    print("| bits | group | MLX dequantize ms | native dequantize ms | GEMM (256 tokens) ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bits']} | {r['group']} | {r['mlx_dequantize_ms']:.2f} | {r['native_dequantize_ms']:.2f} | "
              f"{r['gemm_256_tokens_ms']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
