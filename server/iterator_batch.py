"""Interleaves per-request generators one chunk at a time, with the step interface of ``BatchGenerator``.

The engine uses it when it is given a ``generate_fn`` (tests and benchmarks that slow down or break the
generation of a request): each admitted request runs as its own iterator, and a step advances every one of
them by one chunk, so the engine's scheduling (admission, cancellation, errors) is the same either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from mmt_mlx.batch_generate import StepEvent

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel
    from mmt_mlx.generate import GenerationChunk
    from mmt_mlx.request import GenerationRequest

GenerateFn = Callable[["LoadedModel", "GenerationRequest", Callable[[], bool]], Iterator["GenerationChunk"]]


class IteratorBatch:
    def __init__(self, lm: LoadedModel, generate_fn: GenerateFn, max_batch: int) -> None:
        self.lm, self.generate_fn, self.max_batch = lm, generate_fn, max_batch
        self._its: dict[int, Iterator[GenerationChunk]] = {}
        self._uids = itertools.count()

    def __len__(self) -> int:
        return len(self._its)

    @property
    def has_room(self) -> bool:
        return len(self._its) < self.max_batch

    def add(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> int:
        uid = next(self._uids)
        self._its[uid] = iter(self.generate_fn(self.lm, request, should_stop))
        return uid

    def remove(self, uid: int) -> None:
        it = self._its.pop(uid, None)
        close = getattr(it, "close", None)
        if close is not None:
            close()

    def step(self) -> list[StepEvent]:
        events = []
        for uid, it in list(self._its.items()):
            try:
                events.append(StepEvent(uid, chunk=next(it)))
            except StopIteration:
                events.append(StepEvent(uid))  # ended without a last chunk: finished all the same
            except Exception as exc:  # noqa: BLE001 - reported to that request alone
                events.append(StepEvent(uid, error=exc))
            if events[-1].finished:
                self._its.pop(uid, None)
        return events
