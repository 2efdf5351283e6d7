"""Timing MLX models: prompt processing and greedy decoding, after a warm-up."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

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


class MlxTimer:
    """Times one MLX model: ``pp()`` one prompt pass (the runtime's chunked prefill, the head only at the last
    position), ``tg()`` g tokens decoded greedily through the runtime's own generator (a batch of one, as
    ``stream_generate``) from the cache of a one-token prompt; each returns seconds."""

    def __init__(self, lm: LoadedModel, vocab: int, p: int, g: int) -> None:
        self.lm, self.p, self.g = lm, p, g
        self.prompt = bench_tokens(vocab, p)
        # EOS is masked so that every rep decodes all g tokens (random prompts may otherwise end early)
        self.no_eos = SamplingParams(logit_bias={i: -1e30 for i in lm.tokenizer.eos_ids})

    def warm_up(self) -> None:
        """Allocations and MLX's buffer cache (a full-length warm-up would double slow runs)."""
        self._pp(self.prompt[: min(self.p, 64)])
        self._tg(min(self.g, 8))

    def pp(self) -> float:
        return self._pp(self.prompt)

    def tg(self) -> float:
        return self._tg(self.g)

    def _pp(self, tokens: list[int]) -> float:
        model = self.lm.model
        cache = model.make_cache()
        t0 = time.perf_counter()
        mx.eval(prefill(model, tokens, cache))
        return time.perf_counter() - t0

    def _tg(self, n: int) -> float:
        gen = BatchGenerator(self.lm, max_batch=1)
        t0 = time.perf_counter()
        gen.add(make_request(self.lm, self.prompt[:1], max_tokens=n, sampling=self.no_eos))
        done = 0
        while len(gen):
            for event in gen.step():
                if event.error is not None:
                    raise event.error
                done += 1
        if done != n:
            raise RuntimeError(f"the generator stopped after {done} of {n} tokens")
        return time.perf_counter() - t0


def time_mlx(lm: LoadedModel, vocab: int, p: int, g: int, reps: int) -> tuple[list[float], list[float], int]:
    """(pp seconds per rep, tg seconds per rep, peak MLX bytes) of one model timed alone (``MlxTimer``)."""
    t = MlxTimer(lm, vocab, p, g)
    t.warm_up()
    mx.reset_peak_memory()
    pp_t = [t.pp() for _ in range(reps)]
    tg_t = [t.tg() for _ in range(reps)]
    return pp_t, tg_t, int(mx.get_peak_memory())


class Timer(Protocol):
    def warm_up(self) -> None: ...
    def pp(self) -> float: ...
    def tg(self) -> float: ...


# Before each timed call the other engine's threads get this long to stop spinning (MLX's pool polls 0.3 ms
# after a job, llama.cpp's threads poll briefly too), so no engine is timed beside another one's spin-wait.
SETTLE_S = 0.05


def time_alternating(timers: list[Timer], reps: int) -> list[tuple[list[float], list[float]]]:
    """(pp seconds, tg seconds) per timer, their reps taken in turn: round r times every timer's prompt pass,
    then every timer's decode. On a shared host whose speed drifts over minutes (these 2-core VMs: decode rates
    moved by 10-40% between runs minutes apart), the engines then see the same drift, and their ratio
    does not depend on which one ran first."""
    for t in timers:
        t.warm_up()
    out: list[tuple[list[float], list[float]]] = [([], []) for _ in timers]
    for _ in range(reps):
        for i, t in enumerate(timers):
            time.sleep(SETTLE_S)
            out[i][0].append(t.pp())
        for i, t in enumerate(timers):
            time.sleep(SETTLE_S)
            out[i][1].append(t.tg())
    return out
