"""Perplexity of an FGS model directory through the numpy reference decode (``fgs.codec.decode_tensor``).

Same weights as the on-the-fly MLX path (tests/test_rotq.py checks the two agree to float rounding), but each
weight is decoded once, so an 8-chunk run costs one dense f32 pass: the quick way to score rotq conversions on
the shared 2-core machine. `mmt eval ppl -m DIR` scores the same directory on the on-the-fly path.

Run: python bench/rotq_eval.py DIR [-m smollm2-135m-instruct] [--text FILE] [--start STR] [--chunks 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
from mmt_mlx.build import model_from_source
from mmt_mlx.evals.text import read_text
from mmt_mlx.fgs.codec import decode_tensor
from mmt_mlx.fgs.format import load_fgs_model
from mmt_mlx.locate import load_source
from mmt_mlx.perplexity import perplexity
from mmt_mlx.sources import SourceModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fgs_dir")
    ap.add_argument(
        "-m", "--model", default="smollm2-135m-instruct", help="the source the directory came from"
    )
    ap.add_argument("--text", default="tests/fixtures/alice29.txt")
    ap.add_argument("--start", default=None)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    name, src = load_source(a.model)
    manifest, codes, raw = load_fgs_model(Path(a.fgs_dir))
    weights = {k: decode_tensor(tc) for k, tc in codes.items()} | raw
    fake = SourceModel(src.arch, src.config, weights, src.tokenizer, src.path, src.weight_bytes, src.meta)
    lm = model_from_source(fake, name)
    ids = src.tokenizer.encode(read_text(a.text, a.start), add_bos=False)
    t0 = time.perf_counter()
    r = perplexity(lm.model, ids, src.tokenizer.bos_id, ctx=512, chunks=a.chunks)
    rep = manifest.get("report", {})
    row = {"fgs_dir": a.fgs_dir, "model": name, "text": a.text, "start": a.start, "chunks": r.chunks,
           "tokens": r.tokens, "ppl": r.ppl, "bits_per_weight": rep.get("bits_per_weight"),
           "stored_bytes": rep.get("stored_bytes"), "convert_seconds": rep.get("seconds"),
           "eval_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print(json.dumps(row) if a.json else f"{a.fgs_dir}: ppl {r.ppl:.3f} ({r.chunks} chunks), "
          f"{row['bits_per_weight']:.3f} bits/weight, {row['stored_bytes'] / 1e6:.2f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
