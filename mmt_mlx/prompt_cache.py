"""Prompt cache: the KV state of finished requests, reused by later requests whose prompt shares a prefix.

Entries are (token ids, per-layer caches) kept least-recently-used first under a byte budget. A lookup finds
the entry sharing the longest token prefix with a new prompt and returns fresh caches cut to that prefix
(never the whole prompt: the last prompt token is always run, since its logits start the generation). A
sliding-window layer only keeps its last ``window - 1 + slack`` keys, so a prefix is reused only where every
layer still holds the exact state for it (:func:`mmt_mlx.cache.reusable_prefix`); the model's output is then
the same as from a cold prefill.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx

from mmt_mlx.cache import LayerCache, nbytes, prefix_copy, reusable_prefix

DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024
MIN_REUSE_TOKENS = 8  # below this a lookup is not worth a copy of every layer


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    caches: list[LayerCache]
    nbytes: int


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """LRU of finished requests' KV caches within ``budget_bytes``; safe to call from several threads."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def insert(self, tokens: list[int], caches: list[LayerCache]) -> None:
        """Keep ``caches`` (holding the state of ``tokens``, in order); drop entries it makes redundant."""
        n = min(c.offset for c in caches) if caches else 0
        tokens_t = tuple(tokens[:n])
        if n < MIN_REUSE_TOKENS:
            return
        kept = [prefix_copy(c, n) for c in caches]  # a copy: the request's preallocated buffers are freed
        mx.eval([c.state for c in kept])
        size = sum(nbytes(c) for c in kept)
        if size > self.budget_bytes:
            return
        with self._lock:
            for key, e in list(self._entries.items()):
                if len(e.tokens) <= n and tokens_t[: len(e.tokens)] == e.tokens:
                    self._drop(key)  # the new entry covers this one
            self._entries[self._next_id] = _Entry(tokens_t, kept, size)
            self._next_id += 1
            self.bytes += size
            while self.bytes > self.budget_bytes and self._entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    def lookup(self, prompt: list[int]) -> tuple[int, list[LayerCache] | None]:
        """(tokens reused, fresh caches holding them) for the best exact prefix of ``prompt``, or (0, None)."""
        limit = len(prompt) - 1  # the last prompt token is always run
        with self._lock:
            best_key, best_n, best = None, 0, None
            for key, e in self._entries.items():
                n = min(_common_prefix(e.tokens, prompt), limit)
                # a sliding layer that dropped keys holds no shorter prefix exactly either: no point trying one
                if n > best_n and all(reusable_prefix(c, n) for c in e.caches):
                    best_key, best_n, best = key, n, e
            if best is None or best_n < MIN_REUSE_TOKENS:
                return 0, None
            self._entries.move_to_end(best_key)
            self.hits += 1
            self.tokens_reused += best_n
            return best_n, [prefix_copy(c, best_n) for c in best.caches]
