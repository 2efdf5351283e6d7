"""Pieces shared by the architectures: attention masks and attention itself."""

from __future__ import annotations

import mlx.core as mx


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
