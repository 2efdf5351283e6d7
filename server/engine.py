"""The generation engine: one worker thread running a continuous batch, fed by a bounded FIFO of requests.

MLX must not be driven from several threads at once, so everything that touches the model -- loading it
included -- happens in a single worker thread. It admits queued requests into a
:class:`~mmt_mlx.batch_generate.BatchGenerator` (up to ``max_batch`` at once) and steps it: every running
request gets its next token from one batched forward, a newcomer's prompt is prefilled a chunk per step, and
a finished request leaves at once, letting the next queued one in. The asyncio side submits a :class:`Job`
and reads :class:`~mmt_mlx.generate.GenerationChunk` objects from the job's own ``asyncio.Queue`` (filled
with ``loop.call_soon_threadsafe``), so a request only ever sees its own tokens.

A client that goes away sets ``job.cancel``: a waiting job leaves the queue at once, a running one leaves the
batch before the next step, so its slot goes to the next request promptly. A request whose generation fails
gets its error; the others in the batch go on.

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

from mmt_mlx.batch_generate import BatchGenerator, StepEvent
from mmt_mlx.errors import MmtError
from mmt_mlx.generate import GenerationChunk
from mmt_mlx.prompt_cache import PromptCache
from mmt_mlx.request import GenerationRequest

from .iterator_batch import IteratorBatch

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel

log = logging.getLogger("mmt_mlx.server")

_END = object()  # end-of-stream marker put on a job's queue after its last chunk (or error)


class GenerateFn(Protocol):
    """A per-request generator (``mmt_mlx.generate.generate_request``'s signature) that replaces the batched
    generator, for tests and benchmarks; the engine interleaves these one chunk per step."""

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
    cached_tokens: int = 0  # prompt tokens reused from the prompt cache
    ttft: float | None = None  # seconds from submission to the first token (None: no token came)


@dataclass(frozen=True)
class EngineGauges:
    """The engine's state right now, for ``/metrics``."""

    queue_depth: int  # jobs waiting
    running: int  # jobs being generated (the running batch)
    max_queue: int  # waiting jobs allowed (more get 429)
    max_batch: int = 1  # jobs generated together at most
    prompt_cache_bytes: int = 0  # KV bytes held by the prompt cache
    prompt_cache_entries: int = 0


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
    first_token: float | None = None
    last: GenerationChunk | None = None  # the latest chunk sent

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
    """Loads the model, then runs queued jobs in a continuous batch in its worker thread."""

    def __init__(
        self,
        loader: Callable[[], LoadedModel],
        *,
        max_queue: int = 16,
        max_batch: int = 1,
        prompt_cache_bytes: int = 0,
        generate_fn: GenerateFn | None = None,
        on_generation: Callable[[GenerationStats], None] | None = None,
    ) -> None:
        """``loader`` runs in the worker thread at :meth:`start`; ``max_batch`` jobs are generated together;
        ``prompt_cache_bytes`` > 0 keeps finished requests' KV state for prompts that share a prefix;
        ``generate_fn`` replaces the batched generator (tests, benchmarks); ``on_generation`` is called (in
        the worker thread) after every generation that produced at least one chunk."""
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.loader = loader
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.prompt_cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self._on_generation = on_generation
        self._generate_fn = generate_fn
        self.lm: LoadedModel | None = None
        self.state = "new"  # new -> loading -> ready | failed
        self.error: BaseException | None = None
        self.loaded = threading.Event()  # set once loading ended (ready or failed)
        self.loaded_at = time.time()
        self._pending: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}  # uid in the batch -> job
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
            running = list(self._active.values())
            self._cond.notify_all()
        for job in pending:
            job.cancel.set()
            job._emit(_END)
        for job in running:
            job.cancel.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- submission (asyncio side) ------------------------------------------------------------------

    def gauges(self) -> EngineGauges:
        pc = self.prompt_cache
        with self._cond:
            return EngineGauges(
                len(self._pending), len(self._active), self.max_queue, self.max_batch,
                pc.bytes if pc else 0, len(pc) if pc else 0,
            )  # fmt: skip

    def submit(self, job: Job) -> None:
        """Queue a job; raises :class:`QueueFullError` when ``max_queue`` jobs already wait."""
        if self.state != "ready":
            raise NotReadyError(self.state)
        with self._cond:
            if self._stopping:
                raise NotReadyError("stopping")
            # the running batch does not count: max_queue jobs may wait behind it
            busy = len(self._active) >= self.max_batch or bool(self._pending)
            if len(self._pending) >= self.max_queue and busy:
                raise QueueFullError()
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: drop it from the queue if it still waits, else it leaves the batch before the next step."""
        job.cancel.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                self._cond.notify()
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
        if self._generate_fn is not None:
            batch: BatchGenerator | IteratorBatch = IteratorBatch(self.lm, self._generate_fn, self.max_batch)
        else:
            batch = BatchGenerator(self.lm, max_batch=self.max_batch, prompt_cache=self.prompt_cache)
        try:
            while self._admit(batch):
                self._drop_cancelled(batch)
                try:
                    events = batch.step()
                except Exception as exc:  # noqa: BLE001 - a bug in the step itself: fail the batch, keep serving
                    log.exception("generation step failed")
                    events = [StepEvent(uid, error=exc) for uid in list(self._active)]
                    for uid in list(self._active):
                        batch.remove(uid)
                for event in events:
                    self._deliver(event)
        finally:
            for uid in list(self._active):
                batch.remove(uid)
                self._finish(uid, cancelled=True)

    def _admit(self, batch: BatchGenerator | IteratorBatch) -> bool:
        """Wait for work; move queued jobs into the batch while it has room. False once stopping."""
        with self._cond:
            while not self._pending and not self._active and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            admitted = []
            while self._pending and batch.has_room and len(self._active) + len(admitted) < self.max_batch:
                admitted.append(self._pending.popleft())
        for job in admitted:
            if job.cancel.is_set():
                job._emit(_END)
                continue
            job.started = time.perf_counter()
            try:
                uid = batch.add(job.request, job.cancel.is_set)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                job._emit(exc)
                job._emit(_END)
                continue
            with self._cond:
                self._active[uid] = job
        return True

    def _drop_cancelled(self, batch: BatchGenerator | IteratorBatch) -> None:
        for uid, job in list(self._active.items()):
            if job.cancel.is_set():
                batch.remove(uid)
                self._finish(uid, cancelled=True)

    def _deliver(self, event: StepEvent) -> None:
        job = self._active.get(event.uid)
        if job is None:
            return
        if event.error is not None:
            if not isinstance(event.error, MmtError):
                log.error("generation failed", exc_info=event.error)
            job._emit(event.error)
        elif event.chunk is not None:
            if job.first_token is None:
                job.first_token = time.perf_counter()
            job.last = event.chunk
            job._emit(event.chunk)
        if event.finished:
            self._finish(event.uid, cancelled=job.cancel.is_set())

    def _finish(self, uid: int, cancelled: bool) -> None:
        with self._cond:
            job = self._active.pop(uid, None)
        if job is None:
            return
        last = job.last
        if last is not None and self._on_generation is not None:
            ttft = job.first_token - job.submitted if job.first_token is not None else None
            self._on_generation(GenerationStats(
                int(last.prompt_tokens), int(last.generation_tokens), float(last.prompt_tps or 0.0),
                float(last.generation_tps or 0.0), cancelled, int(last.cached_tokens), ttft,
            ))  # fmt: skip
        job._emit(_END)
