"""The KV state of a continuous batch in one left-padded buffer per layer, so a decode step costs a fixed
number of attention ops whatever the number of streams.

Each stream keeps its own caches (``mmt_mlx.cache``) while it prefills and when it leaves; while streams
decode together their keys and values are copied into one (B, H, capacity, D) buffer per layer, each row
right-aligned on a common column ``end`` (row i's position 0 sits at column ``pads[i]``). A step then writes
every row's new key with one update, rotates every row at its own position with one RoPE call (an array of
offsets) and runs one masked attention over the batch. The mask hides the padding and, for sliding-window
layers, keys older than the window, so each row sees exactly the keys it would see alone. The buffer is
rebuilt only when the batch's membership changes (:meth:`PaddedBatch.row_caches` gives a row back as
ordinary caches, for the prompt cache or the next buffer).

A sliding layer's buffer keeps every key while the batch lasts (masked once out of the window) and is cut
back to the window when the row is handed back.
"""

from __future__ import annotations

import mlx.core as mx

from mmt_mlx.cache import KVCache, LayerCache, SlidingKVCache

GROW = 64  # columns added when the buffer is full (a regrow copies it: rare enough, little slack)


def _stored(cache: LayerCache) -> tuple[mx.array | None, mx.array | None, int]:
    """(keys, values, first position) of what a stream's layer cache holds for positions < offset."""
    if cache.keys is None:
        return None, None, cache.offset
    if isinstance(cache, SlidingKVCache):
        return cache.keys, cache.values, cache.start
    return cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :], 0


class PaddedLayer:
    """One layer's view of a :class:`PaddedBatch` (what the model's attention receives as its cache)."""

    def __init__(self, batch: PaddedBatch, keys: mx.array, values: mx.array, window: int | None) -> None:
        self.batch, self.keys, self.values, self.window = batch, keys, values, window

    @property
    def positions(self) -> mx.array:
        """(B,) position of each row's new token (RoPE offsets)."""
        return self.batch.positions

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write each row's new (B, H, 1, D) key/value at column ``end``; return the keys/values up to it."""
        end = self.batch.end
        if end + 1 > self.keys.shape[2]:
            b, h, _, d = self.keys.shape
            self.keys = mx.concatenate([self.keys, mx.zeros((b, h, GROW, d), self.keys.dtype)], axis=2)
            self.values = mx.concatenate([self.values, mx.zeros((b, h, GROW, d), self.values.dtype)], axis=2)
        self.keys[..., end : end + 1, :] = keys
        self.values[..., end : end + 1, :] = values
        return self.keys[..., : end + 1, :], self.values[..., : end + 1, :]

    def mask(self) -> mx.array:
        return self.batch.mask(self.window)


class PaddedBatch:
    """The decode state of streams ``uids`` (in batch order); ``rows[i]`` is stream i's list of layer caches."""

    def __init__(self, uids: tuple[int, ...], rows: list[list[LayerCache]]) -> None:
        self.uids = uids
        self.offsets = [row[0].offset for row in rows]
        self.end = max(self.offsets)  # the column of this step's new tokens
        self.pads = [self.end - o for o in self.offsets]
        self._masks: dict[int | None, mx.array] = {}
        cap = ((self.end + 1 + GROW - 1) // GROW) * GROW
        self.layers: list[PaddedLayer] = []
        for li, first in enumerate(rows[0]):
            window = first.window if isinstance(first, SlidingKVCache) else None
            ks, vs = [], []
            for row, pad in zip(rows, self.pads):
                k, v, start = _stored(row[li])
                if k is None:
                    raise ValueError("a stream joined the batch before its prefill")
                lead = pad + start  # columns before the row's first stored key
                ks.append(_pad(k, lead, cap - self.end))
                vs.append(_pad(v, lead, cap - self.end))
            self.layers.append(PaddedLayer(self, mx.concatenate(ks), mx.concatenate(vs), window))
        self.positions = mx.array(self.offsets, dtype=mx.int32)

    def mask(self, window: int | None) -> mx.array:
        """(B, 1, 1, end + 1) bool: the columns each row's query may see (one mask per window per step)."""
        if window not in self._masks:
            cols = mx.arange(self.end + 1)[None, :]
            pads = mx.array(self.pads)[:, None]
            ok = cols >= pads
            if window is not None:
                ok = ok & (cols - pads > mx.array(self.offsets)[:, None] - window)
            self._masks[window] = ok[:, None, None, :]
        return self._masks[window]

    def advance(self) -> None:
        """After a forward: every row holds one more token."""
        self.end += 1
        self.offsets = [o + 1 for o in self.offsets]
        self.positions = self.positions + 1
        self._masks = {}

    def row_caches(self, i: int, like: list[LayerCache]) -> list[LayerCache]:
        """Row i as ordinary layer caches of the kinds in ``like`` (its caches before it joined)."""
        out: list[LayerCache] = []
        pad, n = self.pads[i], self.offsets[i]
        for layer, old in zip(self.layers, like):
            k = layer.keys[i : i + 1, :, pad : self.end, :]
            v = layer.values[i : i + 1, :, pad : self.end, :]
            if isinstance(old, SlidingKVCache):
                c: LayerCache = SlidingKVCache(old.window, old.slack)
                keep = min(old.window - 1 + old.slack, n)
                c.keys, c.values, c.start = k[..., n - keep :, :], v[..., n - keep :, :], n - keep
            else:
                c = KVCache()
                c.keys, c.values = k, v
            c.offset = n
            out.append(c)
        return out


def shell(cache: LayerCache) -> LayerCache:
    """An empty cache of the same kind and position: what a stream keeps while its keys live in the batch's
    buffer (so the buffer it came from is freed; ``row_caches`` needs only its kind)."""
    out: LayerCache = (
        SlidingKVCache(cache.window, cache.slack) if isinstance(cache, SlidingKVCache) else KVCache()
    )
    out.offset = cache.offset
    return out


def _pad(a: mx.array, before: int, after: int) -> mx.array:
    b, h, _, d = a.shape
    parts = [mx.zeros((b, h, before, d), a.dtype)] if before else []
    parts.append(a)
    if after:
        parts.append(mx.zeros((b, h, after, d), a.dtype))
    return mx.concatenate(parts, axis=2) if len(parts) > 1 else a
