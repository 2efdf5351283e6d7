"""Perplexity with llama.cpp's chunking rule: each chunk is BOS + (ctx - 1) text tokens, all scored after BOS."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mmt_mlx.errors import MmtError


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int  # tokens scored
    chunks: int
    ctx: int
    nll: float  # mean negative log-likelihood (nats)
    seconds: float
    tokens_per_second: float


def chunk_tokens(ids: list[int], bos: int, ctx: int, chunks: int) -> list[list[int]]:
    step = ctx - 1
    available = len(ids) // step
    if available == 0:
        raise MmtError(f"the text has {len(ids)} tokens, fewer than one chunk of {step}")
    n = available if chunks <= 0 else min(chunks, available)
    return [[bos] + ids[i * step : (i + 1) * step] for i in range(n)]


def perplexity(
    model,
    ids: list[int],
    bos: int,
    ctx: int = 512,
    chunks: int = 8,
    progress: Callable[[int, int], None] | None = None,
    per_token: bool = False,
) -> PerplexityResult:
    """Score ``ids`` (text tokens without BOS) in chunks; ``model(tokens, cache)`` returns logits.

    ``per_token`` feeds each chunk one token per call through the cache, as decoding does, so the scores come
    from the decode path (on the CPU: the integer kernels and fused layers, not the prompt's GEMM)."""
    if ctx < 2:
        raise MmtError("ctx must be at least 2")
    parts = chunk_tokens(ids, bos, ctx, chunks)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    for i, part in enumerate(parts):
        x = mx.array(part)[None]
        logits = _decode_logits(model, x[:, :-1]) if per_token else model(x[:, :-1], model.make_cache())
        logits = logits.astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = x[:, 1:]
        nll = -mx.take_along_axis(logp, target[..., None], axis=-1).squeeze(-1)
        total += float(np.asarray(nll, dtype=np.float64).sum())
        count += target.size
        if progress:
            progress(i + 1, len(parts))
    dt = time.perf_counter() - t0
    mean = total / count
    return PerplexityResult(math.exp(mean), count, len(parts), ctx, mean, dt, count / dt if dt else 0.0)


def _decode_logits(model, x: mx.array) -> mx.array:
    """(1, T, vocab) logits of x fed one token at a time through one cache."""
    cache = model.make_cache()
    steps = []
    for i in range(x.shape[1]):
        steps.append(model(x[:, i : i + 1], cache))
        mx.eval(steps[-1])
    return mx.concatenate(steps, axis=1)
