"""Would a PCA (low-rank) residual level pay on rotated Gaussian codes? Measure before building it.

For sample tensors of an ``mmt convert --bpw`` directory: the share of the coding error ||W - W_hat||^2 that the
best rank-r correction U V^T removes (SVD of the residual, f16 factors: r (rows + cols) x 16 bits), per bit
per weight it costs, beside what one more code bit buys (the Lloyd-Max distortion ratio of N(0, 1) from b to
b + 1 bits: the error shrinks by that factor at 1 bit per weight).

Run: python bench/pca_residual.py DIR [-m smollm2-135m-instruct] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mmt_mlx.fgs.codec import decode_tensor
from mmt_mlx.fgs.format import load_fgs_model
from mmt_mlx.locate import load_source
from mmt_mlx.rotq_convert import gaussian_distortion

RANKS = (4, 8, 16, 32)
CLASSES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def residual_capture(w: np.ndarray, w_hat: np.ndarray) -> np.ndarray:
    """Cumulative share of ||W - W_hat||^2 removed by the best rank-r correction, r = 1, 2, ..."""
    s = np.linalg.svd(w.astype(np.float64) - w_hat.astype(np.float64), compute_uv=False)
    return np.cumsum(s**2) / np.sum(s**2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fgs_dir")
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", default="0,10,20,29", help="layer indices sampled")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    _, src = load_source(a.model)
    _, codes, _ = load_fgs_model(Path(a.fgs_dir))
    rows = []
    for layer in (int(i) for i in a.layers.split(",")):
        for cls in CLASSES:
            name = f"layers.{layer}.{cls}.weight"
            if name not in codes:
                continue
            w, lv = src.weights[name], codes[name].levels[0]
            m, k = w.shape
            cap = residual_capture(w, decode_tensor(codes[name]))
            bits = int(lv.bits)
            bit_gain = 1 - gaussian_distortion(bits + 1) / gaussian_distortion(bits) if bits < 8 else 0.0
            row = {"tensor": name, "shape": [m, k], "bits": bits, "one_more_bit_removes": round(bit_gain, 3)}
            for r in RANKS:
                cost = r * (m + k) * 16 / (m * k)
                row[f"rank{r}"] = {"removes": round(float(cap[r - 1]), 4), "bpw": round(cost, 3),
                                   "removes_per_bpw": round(float(cap[r - 1]) / cost, 3)}  # fmt: skip
            rows.append(row)
            print(f"{name:<36} {bits}b  +1 bit: {bit_gain:.0%}/bpw  "
                  + "  ".join(f"r{r}: {row[f'rank{r}']['removes']:.1%} for {row[f'rank{r}']['bpw']:.2f} bpw"
                              for r in RANKS), flush=True)  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "dir": a.fgs_dir, "tensors": rows}, indent=1))


if __name__ == "__main__":
    main()
