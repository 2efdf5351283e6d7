"""Timing MLX models: prompt processing and greedy decoding, after a warm-up."""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.generate import prefill


def bench_tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    """Random ids away from the low (special) ids, as llama-bench feeds random tokens."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(1000, vocab // 2), vocab, size=n).tolist()


def time_mlx(model: nn.Module, vocab: int, p: int, g: int, reps: int) -> tuple[list[float], list[float], int]:
    """(pp seconds per rep, tg seconds per rep, peak MLX bytes). pp runs the runtime's prefill (chunked, the
    head only at the last position); tg decodes g tokens greedily one at a time from an empty cache."""
    prompt = bench_tokens(vocab, p)

    def pp(tokens: list[int]) -> float:
        cache = model.make_cache()
        t0 = time.perf_counter()
        mx.eval(prefill(model, tokens, cache))
        return time.perf_counter() - t0

    def tg(n: int) -> float:
        cache, tok = model.make_cache(), prompt[0]
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(mx.argmax(model(mx.array([[tok]]), cache)[0, -1]).item())
        return time.perf_counter() - t0

    pp(
        prompt[: min(p, 64)]
    )  # warm-up: allocations and MLX's buffer cache (full length would double slow runs)
    tg(min(g, 8))
    mx.reset_peak_memory()
    pp_t = [pp(prompt) for _ in range(reps)]
    tg_t = [tg(g) for _ in range(reps)]
    return pp_t, tg_t, int(mx.get_peak_memory())
