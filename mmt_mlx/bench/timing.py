"""Timing MLX models: prompt processing and greedy decoding, after a warm-up."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from mmt_mlx.batch_generate import BatchGenerator
from mmt_mlx.generate import prefill
from mmt_mlx.request import make_request
from mmt_mlx.sample import SamplingParams

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel


def best_ms(fn, reps: int) -> float:
    """Milliseconds per call of fn() evaluated: the best of 3 rounds of ``reps`` calls, after one warm-up."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn())
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e3


def bench_tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    """Random ids away from the low (special) ids, as llama-bench feeds random tokens."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(1000, vocab // 2), vocab, size=n).tolist()


def time_mlx(lm: LoadedModel, vocab: int, p: int, g: int, reps: int) -> tuple[list[float], list[float], int]:
    """(pp seconds per rep, tg seconds per rep, peak MLX bytes). pp runs the runtime's prefill (chunked, the
    head only at the last position); tg decodes g tokens greedily through the runtime's own generator (a batch
    of one, as ``stream_generate``), from the cache of a one-token prompt."""
    model = lm.model
    prompt = bench_tokens(vocab, p)
    # EOS is masked so that every rep decodes all g tokens (random prompts may otherwise end early)
    no_eos = SamplingParams(logit_bias={i: -1e30 for i in lm.tokenizer.eos_ids})

    def pp(tokens: list[int]) -> float:
        cache = model.make_cache()
        t0 = time.perf_counter()
        mx.eval(prefill(model, tokens, cache))
        return time.perf_counter() - t0

    def tg(n: int) -> float:
        gen = BatchGenerator(lm, max_batch=1)
        t0 = time.perf_counter()
        gen.add(make_request(lm, prompt[:1], max_tokens=n, sampling=no_eos))
        done = 0
        while len(gen):
            for event in gen.step():
                if event.error is not None:
                    raise event.error
                done += 1
        if done != n:
            raise RuntimeError(f"the generator stopped after {done} of {n} tokens")
        return time.perf_counter() - t0

    pp(
        prompt[: min(p, 64)]
    )  # warm-up: allocations and MLX's buffer cache (full length would double slow runs)
    tg(min(g, 8))
    mx.reset_peak_memory()
    pp_t = [pp(prompt) for _ in range(reps)]
    tg_t = [tg(g) for _ in range(reps)]
    return pp_t, tg_t, int(mx.get_peak_memory())
