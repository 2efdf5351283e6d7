"""Where the generator's host thread spends a decode step: graph building, ``mx.async_eval``, waiting.

The generator queues step t + 1 with ``mx.async_eval`` before it reads step t's token, so that building the next
graph overlaps computing this one. This times, over ``mmt bench``'s decode, how long each call takes on the
host thread. If ``async_eval`` takes about as long as the step's computation, the overlap is not happening
(MLX's evaluation keeps only a few tasks in flight and the submitting thread waits for the rest).

Run: python bench/decode_host_time.py [-m MODEL] [-g 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

# isort: off
import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

from mmt_mlx import batch_generate
from mmt_mlx.cli import main as mmt_main
# isort: on

TOTALS: dict[str, list[float]] = {}


def timed(name: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc = TOTALS.setdefault(name, [0.0, 0])
            acc[0] += time.perf_counter() - t0
            acc[1] += 1

    return run


class _TimedMx:
    """``mx`` as the generator sees it, with its two evaluation calls timed."""

    async_eval = staticmethod(timed("mx.async_eval (queue step t+1)", mx.async_eval))
    eval = staticmethod(timed("mx.eval (wait for step t)", mx.eval))

    def __getattr__(self, name: str):
        return getattr(mx, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-g", type=int, default=128, help="tokens decoded per rep")
    a = ap.parse_args()
    batch_generate.mx = _TimedMx()
    gen = batch_generate.BatchGenerator
    gen._forward = timed("graph building (model forward)", gen._forward)
    args = ["bench", "-p", "16", "-g", str(a.g), "-r", "2", "--no-compare"] + (
        ["-m", a.model] if a.model else []
    )
    mmt_main(args)
    steps = TOTALS.get("mx.async_eval (queue step t+1)", [0.0, 1])[1]
    for name, (t, n) in TOTALS.items():
        print(f"{name:<34} {1e3 * t / max(steps, 1):7.2f} ms per decode step ({n} calls)", file=sys.stderr)


if __name__ == "__main__":
    main()
