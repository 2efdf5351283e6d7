"""Key/value caches for incremental decoding.

``KVCache`` grows a preallocated buffer in steps (no O(T) copy per token). ``SlidingKVCache`` keeps only the
last ``window - 1`` positions once a step is done, so a sliding-window layer's memory is bounded by its window
(plus a buffer's room to append into).
Both report the absolute position of the first key they return, which the attention mask is built from.
``BatchCache`` groups one layer's caches of the requests decoded together in a continuous batch.
``prefix_copy`` gives a new cache holding the first tokens of another (what the prompt cache reuses).
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys/values in a buffer grown ``step`` positions at a time.

    The buffer's positions from ``offset`` on belong to this cache alone: prefix copies and a batch's rows get
    arrays that end at their offset, so their first append reallocates. The fused decode layer relies on it
    to write a token's key and value into the buffer in place (``kernels/cpu/decode_layer.h``).
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # tokens seen so far

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Append (B, H, L, D) keys/values; return every stored key/value and the first key's position."""
        self.append(keys, values)
        assert self.keys is not None and self.values is not None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :], 0

    def append(self, keys: mx.array, values: mx.array) -> None:
        """Store (B, H, L, D) keys/values after the earlier ones (MLX's slice update reuses the buffer)."""
        prev, n = self.offset, keys.shape[2]
        self.reserve(n, keys.shape, values.shape[3], keys.dtype)
        assert self.keys is not None and self.values is not None
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.offset += n

    def reserve(self, n: int, key_shape: tuple[int, ...], value_dim: int, dtype: mx.Dtype) -> None:
        """Make room for ``n`` more positions of (B, H, ., D) keys (and values of width ``value_dim``)."""
        prev = self.offset
        if self.keys is not None and prev + n <= self.keys.shape[2]:
            return
        grow = ((n + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((*key_shape[:2], grow, key_shape[3]), dtype)
        new_v = mx.zeros((*key_shape[:2], grow, value_dim), dtype)
        if self.keys is None or self.values is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class SlidingKVCache:
    """Cache for a sliding-window layer: a query at position p sees keys at p - window + 1 .. p.

    The stored keys (the last ``window - 1 + slack`` positions once a step is done) are ``buf[..., lo:hi]`` of a
    buffer with room after them: an append writes past ``hi`` and moves ``lo`` on, and only when the buffer is
    full are the stored keys copied to the front of a new one (once per ``step`` tokens; a copy of the whole
    window per token had cost Gemma 3 ~3-4 ms of a ~22 ms decode step). As with ``KVCache``, the buffer's positions from
    ``hi`` on belong to this cache alone: ``keys``/``values`` and every copy end at ``hi``, and assigning
    ``keys``/``values`` makes that array the buffer, full, so its first append reallocates.
    """

    step = 256

    def __init__(self, window: int, slack: int = 0) -> None:
        self.window = window
        self.slack = slack  # extra old keys kept (masked out) so a prefix a little shorter stays reusable
        self.buf_k: mx.array | None = None
        self.buf_v: mx.array | None = None
        self.lo = self.hi = 0  # the stored keys' span in the buffers
        self.offset = 0
        self.start = 0  # absolute position of self.keys[..., 0, :]

    @property
    def keys(self) -> mx.array | None:
        return None if self.buf_k is None else self.buf_k[..., self.lo : self.hi, :]

    @keys.setter
    def keys(self, k: mx.array | None) -> None:
        self.buf_k, self.lo, self.hi = k, 0, 0 if k is None else k.shape[2]

    @property
    def values(self) -> mx.array | None:
        return None if self.buf_v is None else self.buf_v[..., self.lo : self.hi, :]

    @values.setter
    def values(self, v: mx.array | None) -> None:  # after keys, whose setter sets the span for both
        self.buf_v = v

    def reserve(self, n: int, key_shape: tuple[int, ...], value_dim: int, dtype: mx.Dtype) -> None:
        """Make room for ``n`` more positions after ``hi`` (the stored keys move to the front of a new buffer)."""
        if self.buf_k is not None and self.hi + n <= self.buf_k.shape[2]:
            return
        room = ((n + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((*key_shape[:2], room, key_shape[3]), dtype)
        new_v = mx.zeros((*key_shape[:2], room, value_dim), dtype)
        if self.buf_k is None or self.buf_v is None:
            self.buf_k, self.buf_v, self.lo, self.hi = new_k, new_v, 0, 0
            return
        stored_k, stored_v = self.keys, self.values
        assert stored_k is not None and stored_v is not None
        self.buf_k = mx.concatenate([stored_k, new_k], axis=2)
        self.buf_v = mx.concatenate([stored_v, new_v], axis=2)
        self.hi -= self.lo
        self.lo = 0

    def appended(self, n: int) -> None:
        """``n`` positions were written at ``hi`` (here or by the fused layer): keep what the next query sees."""
        self.hi += n
        self.offset += n
        keep = min(self.window - 1 + self.slack, self.hi - self.lo)
        self.lo = self.hi - keep
        self.start = self.offset - keep

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Append (B, H, L, D) keys/values; return the stored and new ones and the first one's position."""
        start, n = self.start, keys.shape[2]
        if self.buf_k is None:  # a first prompt: keep its tail as the buffer (full: the next append moves it)
            self.buf_k, self.buf_v, self.lo, self.hi = keys, values, 0, 0
        else:
            self.reserve(n, keys.shape, values.shape[3], keys.dtype)
            assert self.buf_k is not None and self.buf_v is not None
            self.buf_k[..., self.hi : self.hi + n, :] = keys
            self.buf_v[..., self.hi : self.hi + n, :] = values
        lo = self.lo
        self.appended(n)
        assert self.buf_k is not None and self.buf_v is not None
        return self.buf_k[..., lo : self.hi, :], self.buf_v[..., lo : self.hi, :], start

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.keys, self.values) if a is not None]


class BatchCache:
    """One layer's caches of the requests in a batch, row i of the batch being ``caches[i]``."""

    def __init__(self, caches: list) -> None:
        self.caches = caches


LayerCache = KVCache | SlidingKVCache


def reusable_prefix(cache: LayerCache, n: int) -> bool:
    """Whether the first ``n`` tokens' state can be cut out of ``cache`` exactly (for a query at position n)."""
    if n > cache.offset:
        return False
    if isinstance(cache, SlidingKVCache):
        # the next query (position n) sees keys n - window + 1 .. n - 1: they must all still be stored
        return cache.start <= max(0, n - cache.window + 1)
    return True


def prefix_copy(cache: LayerCache, n: int) -> LayerCache:
    """A new cache holding the first ``n`` tokens of ``cache`` (``reusable_prefix`` must hold).

    MLX arrays are immutable values, so the slices share nothing the new cache's updates could change."""
    if isinstance(cache, SlidingKVCache):
        out: LayerCache = SlidingKVCache(cache.window, cache.slack)
        out.start = cache.start
        stored = n - cache.start
    else:
        out = KVCache()
        stored = n
    if n > 0 and cache.keys is not None:
        out.keys = mx.array(cache.keys[..., :stored, :])
        out.values = mx.array(cache.values[..., :stored, :])
    out.offset = n
    return out


def nbytes(cache: LayerCache) -> int:
    return sum(a.nbytes for a in cache.state)
