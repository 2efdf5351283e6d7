"""Key/value caches for incremental decoding.

``KVCache`` grows a preallocated buffer in steps (no O(T) copy per token). ``SlidingKVCache`` keeps only the
last ``window - 1`` positions once a step is done, so a sliding-window layer's memory is bounded by its window.
Both report the absolute position of the first key they return, which the attention mask is built from.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # tokens seen so far

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Append (B, H, L, D) keys/values; return every stored key/value and the first key's position."""
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            shape_k = (*keys.shape[:2], grow, keys.shape[3])
            shape_v = (*values.shape[:2], grow, values.shape[3])
            new_k, new_v = mx.zeros(shape_k, keys.dtype), mx.zeros(shape_v, values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :], 0

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class SlidingKVCache:
    """Cache for a sliding-window layer: a query at position p sees keys at p - window + 1 .. p."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.start = 0  # absolute position of self.keys[..., 0, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        if self.keys is None:
            all_k, all_v = keys, values
        else:
            all_k = mx.concatenate([self.keys, keys], axis=2)
            all_v = mx.concatenate([self.values, values], axis=2)
        start = self.start
        self.offset += keys.shape[2]
        keep = min(self.window - 1, all_k.shape[2])  # what the next query can still see
        self.keys, self.values = all_k[..., -keep:, :], all_v[..., -keep:, :]
        self.start = self.offset - keep
        return all_k, all_v, start

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]
