"""Continuous batching: many requests decoded together, one batched forward per step.

Each request (a *stream*) has its own KV cache, sampler (seed, penalties, logit bias), logits processors,
stop strings and detokenizer. A step runs, in one forward, the last sampled token of every stream that is
decoding: the linear layers see a (B, 1, D) batch (where the weight bandwidth goes), attention runs per
stream against its own cache (:func:`mmt_mlx.models.base.cached_attention`). A newcomer's prompt is then
prefilled by one chunk per step (smaller while others decode, so their tokens keep flowing); its last prompt
token joins the next batched step, whose logits give its first token. Streams leave when they finish; their
caches go to the :class:`~mmt_mlx.prompt_cache.PromptCache`, which also seeds a newcomer's cache.

Only one thread may call a generator (MLX is driven from one thread).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mmt_mlx.batch_cache import PaddedBatch, shell
from mmt_mlx.cache import BatchCache, SlidingKVCache
from mmt_mlx.constrain import GrammarConstraint
from mmt_mlx.sample import Sampler
from mmt_mlx.stream_text import PREFILL_CHUNK, GenerationChunk, StopMatcher

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel
    from mmt_mlx.prompt_cache import PromptCache
    from mmt_mlx.request import GenerationRequest

BUSY_PREFILL_CHUNK = 64  # prompt tokens per step while other streams decode: bounds their stall
SLIDING_SLACK = 128  # extra keys a sliding layer keeps so that a slightly shorter prefix stays reusable


@dataclass
class StepEvent:
    """What a step produced for one stream: a chunk (``finish_reason`` set on its last one), an error, or
    neither (the stream ended without a last chunk)."""

    uid: int
    chunk: GenerationChunk | None = None
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.chunk is None or self.chunk.finish_reason is not None


@dataclass(eq=False)
class _Stream:
    uid: int
    request: GenerationRequest
    should_stop: Callable[[], bool] | None
    sampler: Sampler
    cache: list
    detok: Any
    matcher: StopMatcher
    todo: list[int]  # prompt tokens (but the last) still to prefill
    reused: int  # prompt tokens taken from the prompt cache
    constraint: GrammarConstraint | None  # structured output: the grammar's own per-request state
    last: int | None = None  # a token to feed in the next batched step
    ahead: tuple[mx.array, mx.array | None] | None = None  # (token, log-probs) sampled, not yet read
    generated: list[int] = field(default_factory=list)
    t_start: float = 0.0  # first prefill work (or the first step, for a full cache hit)
    prompt_time: float = 0.0
    t_decode: float = 0.0


class BatchGenerator:
    """Holds up to ``max_batch`` streams; :meth:`step` advances all of them by (at most) one token."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_batch: int = 8,
        prompt_cache: PromptCache | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        busy_prefill_chunk: int = BUSY_PREFILL_CHUNK,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.lm = lm
        self.max_batch = max_batch
        self.prompt_cache = prompt_cache
        self.prefill_chunk = prefill_chunk
        self.busy_prefill_chunk = busy_prefill_chunk
        self._streams: dict[int, _Stream] = {}
        self._uids = itertools.count()
        self._padded: PaddedBatch | None = None  # the decode batch's KV in one buffer (mmt_mlx.batch_cache)

    # -- membership ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def has_room(self) -> bool:
        return len(self._streams) < self.max_batch

    @property
    def decoding(self) -> int:
        """Streams past their prefill."""
        return sum(1 for s in self._streams.values() if not s.todo)

    def add(self, request: GenerationRequest, should_stop: Callable[[], bool] | None = None) -> int:
        """Admit a validated request; returns its uid. ``should_stop`` is polled after each of its tokens."""
        if not self.has_room:
            raise RuntimeError("the batch is full")
        prompt = request.prompt
        reused, cache = 0, None
        if self.prompt_cache is not None:
            reused, cache = self.prompt_cache.lookup(prompt)
        if cache is None:
            cache = self.lm.model.make_cache()
            for c in cache:
                if isinstance(c, SlidingKVCache):
                    c.slack = SLIDING_SLACK if self.prompt_cache is not None else 0
        uid = next(self._uids)
        tok = self.lm.tokenizer
        self._streams[uid] = _Stream(
            uid, request, should_stop, Sampler(request.sampling), cache, tok.detokenizer(),
            StopMatcher(list(request.stop)), list(prompt[reused:-1]), reused,
            GrammarConstraint(tok, request.grammar) if request.grammar is not None else None,
        )  # fmt: skip
        return uid

    def remove(self, uid: int) -> None:
        """Drop a stream at once (a client went away); its cache still feeds the prompt cache."""
        s = self._streams.pop(uid, None)
        if s is not None:
            self._keep(s)

    def _keep(self, s: _Stream) -> None:
        self._unpad(only=s)  # its keys may live in the batch's buffer
        if self.prompt_cache is not None and s.cache:
            self.prompt_cache.insert(s.request.prompt + s.generated, s.cache)

    # -- one step ------------------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """Advance every stream once; returns the events of this step (finished streams have left)."""
        events: list[StepEvent] = []
        now = time.perf_counter()
        for s in list(self._streams.values()):
            if s.t_start == 0.0:
                s.t_start = now
            if s.request.max_tokens == 0:
                events.append(StepEvent(s.uid, self._chunk(s, "", None, None, None, "length")))
                del self._streams[s.uid]
            elif not s.todo and s.last is None and not s.generated:
                s.last = s.request.prompt[-1]  # prefill done (or all reused): the last prompt token joins
        batch = [s for s in self._streams.values() if s.last is not None]
        if batch:
            events += self._decode(batch)
        waiting = [s for s in self._streams.values() if s.todo]
        if waiting:
            events += self._prefill(waiting[0], busy=bool(batch))
        return events

    def _prefill(self, s: _Stream, busy: bool) -> list[StepEvent]:
        n = self.busy_prefill_chunk if busy else self.prefill_chunk
        part, s.todo = s.todo[:n], s.todo[n:]
        try:
            self.lm.model(mx.array(part)[None], s.cache)
            mx.eval([c.state for c in s.cache])
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            del self._streams[s.uid]
            return [StepEvent(s.uid, error=exc)]
        if not s.todo:
            s.last = s.request.prompt[-1]
        return []

    def _decode(self, batch: list[_Stream]) -> list[StepEvent]:
        """Read one token per stream. As mlx-lm's generate_step, the next step's forward is queued on the
        lazy tokens (``mx.async_eval``) before the host reads them, so graph building overlaps computation;
        a batch with a stream whose next logits need the host token (grammar, processors, penalties)
        steps synchronously."""
        fresh = [s for s in batch if s.ahead is None]  # newcomers, or after a synchronous step
        events = self._forward(fresh, [mx.array(s.last, mx.int32) for s in fresh])
        batch = [s for s in batch if s.ahead is not None]
        current = {s.uid: s.ahead for s in batch}
        look = [s for s in batch if len(s.generated) + 1 < s.request.max_tokens]
        if not all(self._host_free(s) for s in batch):
            look = []
        for s in batch:
            s.ahead = None
        if look:
            events += self._forward(look, [current[s.uid][0] for s in look])
            mx.async_eval([a for s in look if s.ahead is not None for a in s.ahead if a is not None])
        batch = [s for s in batch if s.uid in self._streams]  # a failed forward took its streams
        mx.eval([a for s in batch for a in current[s.uid] if a is not None])
        for s in batch:
            token, logp = current[s.uid]
            try:
                events.append(self._advance(s, int(token.item()), logp))
            except Exception as exc:  # noqa: BLE001 - e.g. a grammar that refused the token: this stream only
                self._streams.pop(s.uid, None)
                events.append(StepEvent(s.uid, error=exc))
        return events

    @staticmethod
    def _host_free(s: _Stream) -> bool:
        """Whether the stream's next logits can be processed before the host has read its current token."""
        p = s.request.sampling
        return (
            s.constraint is None
            and not s.request.logits_processors
            and p.repetition_penalty == 1.0
            and not p.presence_penalty
            and not p.frequency_penalty
        )

    def _forward(self, batch: list[_Stream], inputs: list[mx.array]) -> list[StepEvent]:
        """One batched forward on the streams' next tokens (lazy or not); the lazily sampled token (and
        log-probs) go to ``s.ahead``. Errors take the streams concerned out."""
        if not batch:
            return []
        tokens = mx.stack(inputs)
        try:
            padded = self._padded_for(batch)
            if padded is not None:
                cache: list = padded.layers
            else:
                cache = [BatchCache([s.cache[i] for s in batch]) for i in range(len(batch[0].cache))]
            logits = self.lm.model(tokens[:, None], cache)[:, -1].astype(mx.float32)
            if padded is not None:
                padded.advance()
        except Exception as exc:  # noqa: BLE001 - a forward that fails fails every stream in it
            self._padded = None
            for s in batch:
                del self._streams[s.uid]
            return [StepEvent(s.uid, error=exc) for s in batch]
        events: list[StepEvent] = []
        for i, s in enumerate(batch):
            try:
                s.ahead = self._sample(s, logits[i])
            except Exception as exc:  # noqa: BLE001 - e.g. a logits processor that raised: this stream only
                del self._streams[s.uid]
                events.append(StepEvent(s.uid, error=exc))
        return events

    def _padded_for(self, batch: list[_Stream]) -> PaddedBatch | None:
        """The batch's padded KV buffer (rebuilt when its membership changed), or None for a lone stream or
        one whose cache is still empty (those attend row by row)."""
        uids = tuple(s.uid for s in batch)
        if self._padded is not None and self._padded.uids == uids:
            return self._padded
        self._unpad()
        if len(batch) < 2 or any(s.cache[0].offset == 0 for s in batch):
            return None
        self._padded = PaddedBatch(uids, [s.cache for s in batch])
        for s in batch:  # their keys now live in the buffer: drop the old arrays
            s.cache = [shell(c) for c in s.cache]
        return self._padded

    def _unpad(self, only: _Stream | None = None) -> None:
        """Hand the padded buffer's rows back to their streams' own caches (all, or only the one leaving)."""
        p = self._padded
        if p is None:
            return
        for i, uid in enumerate(p.uids):
            s = self._streams.get(uid) if only is None else (only if only.uid == uid else None)
            if s is not None:
                s.cache = p.row_caches(i, s.cache)
        if only is None:
            self._padded = None

    def _sample(self, s: _Stream, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        context = s.request.prompt + s.generated
        processed = s.sampler.process(logits, context, s.generated)
        for proc in s.request.logits_processors:
            processed = proc(context, processed)
        if s.constraint is not None:  # last, so no bias or penalty can bring a forbidden token back
            processed = s.constraint(s.generated, processed)
        logp = logits - mx.logsumexp(logits) if s.request.logprobs else None
        return s.sampler.sample(processed), logp

    def _advance(self, s: _Stream, tid: int, logp: mx.array | None) -> StepEvent:
        """Take the sampled token: text, stop strings, EOS, budget; the stream leaves when it finishes."""
        lp = top = None
        if logp is not None:
            lp = float(logp[tid].item())
            best = mx.argsort(-logp)[: s.request.logprobs]
            top = [(int(i), float(v)) for i, v in zip(best.tolist(), logp[best].tolist())]
        if not s.generated:
            now = time.perf_counter()
            s.prompt_time, s.t_decode = now - s.t_start, now
        s.generated.append(tid)
        s.last = tid
        reason: str | None = None
        if tid in self.lm.tokenizer.eos_ids:
            text, reason = s.matcher.feed(s.detok.finalize())[0] + s.matcher.flush(), "stop"
        else:
            if s.constraint is not None:
                s.constraint.advance(tid)
            text, hit = s.matcher.feed(s.detok.add(tid))
            cancelled = s.should_stop is not None and s.should_stop()
            if hit:
                reason = "stop"
            elif len(s.generated) >= s.request.max_tokens or cancelled:
                rest, hit = s.matcher.feed(s.detok.finalize())
                text += rest + ("" if hit else s.matcher.flush())
                reason = "stop" if hit or cancelled else "length"
        event = StepEvent(s.uid, self._chunk(s, text, tid, lp, top, reason))
        if reason is not None:
            del self._streams[s.uid]
            self._keep(s)
        return event

    @staticmethod
    def _chunk(s: _Stream, text: str, token, lp, top, reason) -> GenerationChunk:
        n, prompt_len = len(s.generated), len(s.request.prompt)
        decode_time = time.perf_counter() - s.t_decode
        return GenerationChunk(
            text, token, lp, top, reason, prompt_len, n,
            prompt_len / s.prompt_time if s.prompt_time else 0.0,
            (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            cached_tokens=s.reused,
        )  # fmt: skip
