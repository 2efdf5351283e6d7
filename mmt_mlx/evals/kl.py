"""KL divergence of a candidate model's next-token distributions against a reference (the dense model)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.errors import MmtError
from mmt_mlx.perplexity import chunk_tokens


def model_module(m) -> nn.Module:
    """Accept a LoadedModel or a bare model module."""
    return getattr(m, "model", m)


@dataclass
class KLResult:
    kl: float  # mean KL(reference || candidate) per scored position, nats
    kl_max: float  # the worst position
    top1_agreement: float  # fraction of positions where both argmaxes agree
    ppl_candidate: float
    ppl_reference: float
    tokens: int
    chunks: int
    ctx: int
    seconds: float


def kl_eval(
    model_a, model_b_reference, ids: list[int], ctx: int = 512, chunks: int = 4, bos: int | None = None
) -> KLResult:
    """KL(reference || candidate) of next-token distributions, averaged over every scored position.

    Chunks follow ``mmt eval ppl`` when ``bos`` is given (BOS + ctx-1 tokens); otherwise ids are cut in
    chunks of ctx. Perplexities of both models on the same positions come for free.
    """
    cand, ref = model_module(model_a), model_module(model_b_reference)
    if ctx < 2:
        raise MmtError("ctx must be at least 2")
    if bos is not None:
        parts = chunk_tokens(ids, bos, ctx, chunks)
    else:
        n = len(ids) // ctx
        if n == 0:
            raise MmtError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}")
        parts = [ids[i * ctx : (i + 1) * ctx] for i in range(n if chunks <= 0 else min(chunks, n))]
    kl_sum = agree = nll_c = nll_r = 0.0
    kl_max, count = 0.0, 0
    t0 = time.perf_counter()
    for part in parts:
        x = mx.array(part)[None]
        target = x[0, 1:]
        # one model at a time, evaluated, so only one (ctx, vocab) logit block per model is alive
        lr = ref(x[:, :-1], ref.make_cache())[0].astype(mx.float32)
        lr = lr - mx.logsumexp(lr, axis=-1, keepdims=True)
        mx.eval(lr)
        lc = cand(x[:, :-1], cand.make_cache())[0].astype(mx.float32)
        lc = lc - mx.logsumexp(lc, axis=-1, keepdims=True)
        kl = mx.sum(mx.exp(lr) * (lr - lc), axis=-1)  # (positions,)
        same = mx.argmax(lr, axis=-1) == mx.argmax(lc, axis=-1)
        tr = -mx.take_along_axis(lr, target[:, None], axis=-1)
        tc = -mx.take_along_axis(lc, target[:, None], axis=-1)
        mx.eval(kl, same, tr, tc)
        kl_np = np.maximum(np.asarray(kl, dtype=np.float64), 0.0)  # rounding can dip a hair below 0
        kl_sum += float(kl_np.sum())
        kl_max = max(kl_max, float(kl_np.max()))
        agree += float(np.asarray(same).sum())
        nll_r += float(np.asarray(tr, dtype=np.float64).sum())
        nll_c += float(np.asarray(tc, dtype=np.float64).sum())
        count += len(part) - 1
        del lr, lc, kl
    dt = time.perf_counter() - t0
    return KLResult(
        kl_sum / count, kl_max, agree / count, math.exp(nll_c / count), math.exp(nll_r / count),
        count, len(parts), ctx, dt,
    )  # fmt: skip
