"""Sampling: turn one step's logits into the next token (temperature, top-k, top-p, min-p, penalties, bias)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import mlx.core as mx

from mmt_mlx import native

REPEAT_LAST_N = 64  # like llama.cpp: the repetition penalty looks at this many recent tokens


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # llama.cpp/HF style: divide positive logits, multiply negative ones
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None

    def validate(self) -> None:
        from mmt_mlx.errors import MmtError

        if self.temperature < 0:
            raise MmtError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise MmtError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise MmtError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise MmtError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise MmtError("repetition_penalty must be > 0")


class Sampler:
    """Stateful per request: owns its random key, so the same seed gives the same tokens."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.p = params
        seed = (
            params.seed if params.seed is not None else int.from_bytes(__import__("os").urandom(4), "little")
        )
        self.key = mx.random.key(seed)
        self.bias = None
        if params.logit_bias:
            ids = mx.array(list(params.logit_bias.keys()), dtype=mx.int32)
            vals = mx.array(list(params.logit_bias.values()), dtype=mx.float32)
            self.bias = (ids, vals)

    def process(self, logits: mx.array, context: list[int], generated: list[int]) -> mx.array:
        """Apply bias and penalties to a (vocab,) f32 logits vector."""
        p = self.p
        if self.bias is not None:
            ids, vals = self.bias
            logits = logits.at[ids].add(vals)
        if p.repetition_penalty != 1.0 and context:
            ids = mx.array(sorted(set(context[-REPEAT_LAST_N:])), dtype=mx.int32)
            sel = logits[ids]
            sel = mx.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
            logits[ids] = sel
        if (p.presence_penalty or p.frequency_penalty) and generated:
            counts = Counter(generated)
            ids = mx.array(list(counts.keys()), dtype=mx.int32)
            c = mx.array(list(counts.values()), dtype=mx.float32)
            logits = logits.at[ids].add(-(p.presence_penalty + p.frequency_penalty * c))
        return logits

    def sample(self, logits: mx.array) -> mx.array:
        """Pick a token from processed (vocab,) logits; returns a 0-d int32 array."""
        p = self.p
        if p.temperature == 0:
            return native.argmax(logits).astype(mx.int32)
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = mx.sort(logits)[-p.top_k]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if p.min_p > 0:
            threshold = mx.max(logits) + mx.log(mx.array(p.min_p))
            logits = mx.where(logits < threshold, -mx.inf, logits)
        if p.top_p < 1.0:
            # keep the smallest set of best tokens whose mass reaches top_p: a threshold, no scatter
            ordered = mx.sort(logits)[::-1]
            probs = mx.softmax(ordered)
            before = mx.cumsum(probs) - probs  # mass strictly above each token
            cutoff = mx.min(mx.where(before < p.top_p, ordered, mx.inf))
            logits = mx.where(logits < cutoff, -mx.inf, logits)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logits, key=sub).astype(mx.int32)
