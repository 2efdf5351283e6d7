"""The generation engine: one worker thread, fed by a bounded FIFO of requests.

MLX must not be driven from several threads at once, so everything that touches the model -- loading it
included -- happens in a single worker thread. Requests are served one after another (no batching). The
asyncio side submits a :class:`Job` and reads :class:`~mmt_mlx.generate.GenerationChunk` objects from the
job's own ``asyncio.Queue`` (filled with ``loop.call_soon_threadsafe``), so a request only ever sees its own
tokens; each generation starts from a fresh cache inside ``generate_request``.

A client that goes away sets ``job.cancel``: a waiting job leaves the queue at once, a running one is stopped
through ``should_stop`` before its next token, so the next request starts promptly.

The engine knows nothing of HTTP or of the metrics: it reports each finished generation to the
``on_generation`` hook it is given, and its gauges through :meth:`Engine.gauges`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mmt_mlx.errors import MmtError
from mmt_mlx.generate import GenerationChunk, generate_request
from mmt_mlx.request import GenerationRequest

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel

log = logging.getLogger("mmt_mlx.server")

_END = object()  # end-of-stream marker put on a job's queue after its last chunk (or error)


class GenerateFn(Protocol):
    """What the worker runs for a job: ``mmt_mlx.generate.generate_request`` unless a test replaces it."""

    def __call__(
        self, lm: LoadedModel, request: GenerationRequest, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationChunk]: ...


@dataclass(frozen=True)
class GenerationStats:
    """One finished (or cancelled) generation, as reported to the ``on_generation`` hook."""

    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    cancelled: bool


@dataclass(frozen=True)
class EngineGauges:
    """The engine's state right now, for ``/metrics``."""

    queue_depth: int  # jobs waiting
    running: int  # jobs being generated
    max_queue: int  # waiting jobs allowed (more get 429)


class QueueFullError(Exception):
    pass


class NotReadyError(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One generation request, from the HTTP handler to the worker and back."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None

    def _emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel.set()

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """Yield this job's chunks; re-raise an exception raised by the generator."""
        while True:
            item = await self.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Engine:
    """Loads the model, then runs queued jobs one at a time in its worker thread."""

    def __init__(
        self,
        loader: Callable[[], LoadedModel],
        *,
        max_queue: int = 16,
        generate_fn: GenerateFn | None = None,
        on_generation: Callable[[GenerationStats], None] | None = None,
    ) -> None:
        """``loader`` runs in the worker thread at :meth:`start`; ``generate_fn`` replaces
        ``generate_request`` (tests, benchmarks); ``on_generation`` is called (in the worker thread) after
        every generation that produced at least one chunk."""
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.loader = loader
        self.max_queue = max_queue
        self._on_generation = on_generation
        self._generate_fn: GenerateFn = generate_fn or generate_request
        self.lm: LoadedModel | None = None
        self.state = "new"  # new -> loading -> ready | failed
        self.error: BaseException | None = None
        self.loaded = threading.Event()  # set once loading ended (ready or failed)
        self.loaded_at = time.time()
        self._pending: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self.state = "loading"
        self._thread = threading.Thread(target=self._main, name="mmt-generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._pending)
            self._pending.clear()
            running = self._running
            self._cond.notify_all()
        for job in pending:
            job.cancel.set()
            job._emit(_END)
        if running is not None:
            running.cancel.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- submission (asyncio side) ------------------------------------------------------------------

    def gauges(self) -> EngineGauges:
        with self._cond:
            return EngineGauges(len(self._pending), int(self._running is not None), self.max_queue)

    def submit(self, job: Job) -> None:
        """Queue a job; raises :class:`QueueFullError` when ``max_queue`` jobs already wait."""
        if self.state != "ready":
            raise NotReadyError(self.state)
        with self._cond:
            if self._stopping:
                raise NotReadyError("stopping")
            # the job being generated does not count: max_queue jobs may wait behind it
            if len(self._pending) >= self.max_queue and (self._running is not None or self._pending):
                raise QueueFullError()
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: drop it from the queue if it still waits, else stop it before its next token."""
        job.cancel.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return
        job._emit(_END)

    # -- worker thread -----------------------------------------------------------------------------------

    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.lm = self.loader()
        except BaseException as exc:  # noqa: BLE001 - reported through /health and serve()
            self.error = exc
            self.state = "failed"
            log.error("model failed to load: %s", exc)
            self.loaded.set()
            return
        self.loaded_at = time.time()
        self.state = "ready"
        log.info("model %s ready (%.1f s)", getattr(self.lm, "name", "?"), time.perf_counter() - t0)
        self.loaded.set()
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self._running = job
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            job._emit(_END)
            return
        job.started = time.perf_counter()
        last = None
        try:
            assert self.lm is not None
            for chunk in self._generate_fn(self.lm, job.request, job.cancel.is_set):
                last = chunk
                job._emit(chunk)
                if job.cancel.is_set():
                    break
        except Exception as exc:
            if not isinstance(exc, MmtError):
                log.exception("generation failed")
            job._emit(exc)
        finally:
            if last is not None and self._on_generation is not None:
                self._on_generation(GenerationStats(
                    int(last.prompt_tokens), int(last.generation_tokens), float(last.prompt_tps or 0.0),
                    float(last.generation_tps or 0.0), job.cancel.is_set(),
                ))  # fmt: skip
            job._emit(_END)
