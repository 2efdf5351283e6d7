"""Paired decode speed of settings that differ only in environment variables, interleaved on one machine.

    python bench/paired_decode.py [-m MODEL] [--rounds 4] [--tokens 40] VARIANT [VARIANT ...]

A VARIANT is "" (as shipped) or "VAR=VAL[,VAR=VAL...]", e.g. "MMT_FUSED_LAYER=0" or "MMT_SPLIT_MATVEC=0".
Every round runs each variant once, in a fresh process (some settings are read once per process), on the same
prompt: a warm-up generation, then one timed generation of ``--tokens`` tokens through the runtime's generator.
Interleaving is what makes two settings comparable on a host whose speed drifts within minutes; the medians
over rounds are printed (tok/s) with every round's value.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one_run(model: str | None, tokens: int) -> float:
    """Decode tok/s of one greedy generation (after a warm-up), in this process."""
    # isort: off
    import mmt_mlx  # noqa: F401  (BLAS preload before mlx)

    from mmt_mlx.generate import stream_generate
    from mmt_mlx.loader import load_model
    # isort: on

    lm = load_model(model, progress=False)
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 20)
    list(stream_generate(lm, prompt, max_tokens=8))
    t0, n = None, 0
    for _ in stream_generate(lm, prompt, max_tokens=tokens + 1):
        if t0 is None:
            t0 = time.perf_counter()  # from the first token: decode only
        else:
            n += 1
    assert t0 is not None
    return n / (time.perf_counter() - t0)


def parse_variant(v: str) -> dict[str, str]:
    out = {}
    for kv in filter(None, v.split(",")):
        key, _, val = kv.partition("=")
        out[key.strip()] = val.strip()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--json")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one run, print tok/s
    ap.add_argument("variants", nargs="*", default=[""])
    args = ap.parse_args()
    if args.one:
        print(one_run(args.model, args.tokens))
        return 0
    child = [sys.executable, __file__, "--one", "--tokens", str(args.tokens)]
    if args.model:
        child += ["-m", args.model]
    res: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:
            env = {**os.environ, **parse_variant(v)}
            out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout
            res[v].append(float(out.split()[-1]))
    summary = {
        "model": args.model or "default",
        "tokens": args.tokens,
        "load_avg": list(os.getloadavg()),
        "tok_s": {v or "as shipped": vals for v, vals in res.items()},
        "median_tok_s": {v or "as shipped": statistics.median(vals) for v, vals in res.items()},
    }
    for v, vals in res.items():
        print(
            f"{v or 'as shipped':32s} median {statistics.median(vals):6.1f} tok/s  ({', '.join(f'{x:.1f}' for x in vals)})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
