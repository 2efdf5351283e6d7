"""Pieces shared by the architectures: attention masks, attention, and cached attention for one or many requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mmt_mlx import native
from mmt_mlx.batch_cache import PaddedLayer
from mmt_mlx.cache import BatchCache


class RMSNorm(nn.Module):
    """RMSNorm whose weight multiplies as is (Llama); on the CPU it is one native node when the kernels load."""

    def __init__(self, dims: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    if native.enabled():
        return native.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


def gated_activation(gate: mx.array, up: mx.array, gelu: bool = False) -> mx.array:
    """act(gate) * up, act SiLU or GELU's tanh approximation; one native node on the CPU (the fused decode
    layer computes it with the same function, so both paths give the same bits)."""
    if native.enabled():
        return native.gated_activation(gate, up, gelu)
    return (nn.gelu_approx(gate) if gelu else nn.silu(gate)) * up


class RoPE(nn.RoPE):
    """nn.RoPE (half-split or traditional); the half-split form over whole heads is one native node on the CPU."""

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if not self.traditional and x.ndim == 4 and x.shape[-1] == self.dims and native.enabled():
            off = offset if isinstance(offset, mx.array) else mx.array(offset, dtype=mx.int32)
            return native.rope(x, off, self.dims, self.base, self.scale)
        return super().__call__(x, offset)


def attention_mask(
    offset: int, length: int, key_start: int, key_len: int, window: int | None
) -> mx.array | None:
    """Boolean (length, key_len) mask for queries at offset.. and keys at key_start.., or None if all visible."""
    if length == 1 and (window is None or offset - key_start < window):
        return None
    q = mx.arange(offset, offset + length)[:, None]
    k = mx.arange(key_start, key_start + key_len)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask


# Queries up to which the native kernel attends (one row per query and head, both cores). On a 2-core Zen 4
# (2026-12-03) it took 3.6 ms for a 256-token SmolLM2 prompt's layer against 9 ms for MLX's CPU attention, and
# 35 against 150 ms at 1,024 tokens; Gemma's 256-wide heads: equal. Longer chunks do not occur (PREFILL_CHUNK).
NATIVE_ATTENTION_MAX_QUERIES = 4096


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """(B, H, L, D) attention with grouped KV heads; returns (B, L, H * D)."""
    if q.shape[2] <= NATIVE_ATTENTION_MAX_QUERIES and native.enabled():
        return native.decode_attention(q, k, v, scale, mask)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    b, h, length, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, length, h * d)


def _one_request(
    q: mx.array, k: mx.array, v: mx.array, cache: Any, rope: Callable, scale: float, window: int | None
) -> mx.array:
    offset, length = cache.offset, q.shape[2]
    q, k = rope(q, offset=offset), rope(k, offset=offset)
    k, v, key_start = cache.update_and_fetch(k, v)
    return attention(q, k, v, scale, attention_mask(offset, length, key_start, k.shape[2], window))


def cached_attention(
    q: mx.array, k: mx.array, v: mx.array, cache: Any, rope: Callable, scale: float, window: int | None = None
) -> mx.array:
    """RoPE, cache update and attention for (B, H, L, D) projections; returns (B, L, H * D).

    ``cache`` is one request's layer cache; a :class:`~mmt_mlx.batch_cache.PaddedLayer` holding the decode
    state of a continuous batch in one left-padded buffer (each row rotated at its own position, one masked
    attention for all); or a :class:`~mmt_mlx.cache.BatchCache` of one cache per row, attended row by row
    (newcomers whose cache is still empty).
    """
    if isinstance(cache, PaddedLayer):  # the batch's state in one buffer: a fixed number of ops for any B
        q, k = rope(q, offset=cache.positions), rope(k, offset=cache.positions)
        keys, values = cache.update_and_fetch(k, v)
        return attention(q, keys, values, scale, cache.mask())
    if not isinstance(cache, BatchCache):
        return _one_request(q, k, v, cache, rope, scale, window)
    outs = [
        _one_request(q[i : i + 1], k[i : i + 1], v[i : i + 1], c, rope, scale, window)
        for i, c in enumerate(cache.caches)
    ]
    return mx.concatenate(outs, axis=0)
