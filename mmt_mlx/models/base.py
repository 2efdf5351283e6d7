"""Pieces shared by the architectures: attention masks, attention, and cached attention for one or many requests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from mmt_mlx.batch_cache import PaddedLayer
from mmt_mlx.cache import BatchCache


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


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """(B, H, L, D) attention with grouped KV heads; returns (B, L, H * D)."""
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
