"""Output error of one layer's projections with scalar and with trellis-coded rotq codes, same bits and group.

For each 2-D weight of the layer: GPTQ in the rotated basis with the calibration covariance (the shipped
calibration text), log-scale codes, as ``mmt convert --bpw`` encodes; the relative output error
tr(dW H dW^T) / tr(W H W^T) under that covariance, and the trellis codes' gain in dB.

    python bench/trellis_layer_errors.py [-m smollm2-135m-instruct] [--layer 10] [--tokens 2048] [--json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
from mmt_mlx.build import model_from_source
from mmt_mlx.fgs.encoders.gauss_codes import decode_rotq, encode_rotq, output_error
from mmt_mlx.locate import load_source
from mmt_mlx.rotq_calibrate import calibration_chunks, input_covariances, seed_of
from mmt_mlx.rotq_convert import _tensor_cov


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens for the covariances")
    ap.add_argument("--bits", default="3,4,5")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    name, src = load_source(a.model)
    lm = model_from_source(src, name)
    keys, covs = input_covariances(lm.model, calibration_chunks(lm.tokenizer, a.tokens, 512))
    prefix = f"layers.{a.layer}."
    rows = []
    for n, w in src.weights.items():
        if w.ndim != 2 or not n.startswith(prefix):
            continue
        _, h = _tensor_cov(n, keys, covs)
        for bits in (int(b) for b in a.bits.split(",")):
            for g in (32, 64):
                err = {
                    kind: output_error(
                        w,
                        decode_rotq(
                            encode_rotq(
                                w,
                                bits,
                                g,
                                seed_of(keys.get(n, n)),
                                h,
                                log_scales=True,
                                trellis=kind == "trellis",
                            )
                        ),
                        h,
                    )  # fmt: skip
                    for kind in ("scalar", "trellis")
                }
                row = {"tensor": n, "bits": bits, "group": g, **err,
                       "gain_db": 10 * np.log10(err["scalar"] / err["trellis"])}  # fmt: skip
                rows.append(row)
                if not a.json:
                    print(f"{n:36s} {bits} bits g{g}: scalar {err['scalar']:.5f} trellis {err['trellis']:.5f} "
                          f"({row['gain_db']:.2f} dB)", flush=True)  # fmt: skip
    if a.json:
        print(json.dumps({"model": name, "layer": a.layer, "tokens": a.tokens, "rows": rows}))


if __name__ == "__main__":
    main()
