"""Running a prepared request on the engine and answering it: one JSON body, or a stream of SSE chunks.

An error before the first chunk is still a proper HTTP error (400 for the user's fault, 500 for ours); an
error once a stream has started is sent as a last SSE event in OpenAI's error shape, then ``[DONE]``.
Whatever way a request ends (finished, client gone, cancelled, failed), its job is cancelled so the engine
frees its slot at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from mmt_mlx.errors import MmtError
from mmt_mlx.generate import GenerationChunk

from . import errors as E
from .engine import Engine, Job, NotReadyError, QueueFullError
from .prepare import PreparedRequest
from .responses import SSE_DONE, Formatter, sse

log = logging.getLogger("mmt_mlx.server")


class JobStream(StreamingResponse):
    """An SSE response that stops its job however it ends: finished, client gone (even before the body
    generator started, when its own ``finally`` would never run), or cancelled."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _watch_disconnect(request: Request, engine: Engine, job: Job) -> None:
    """Cancel ``job`` when the client goes away (the body was read: the next message is the disconnect)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                engine.cancel(job)
                return
    except (asyncio.CancelledError, RuntimeError, OSError):
        return


def submit(engine: Engine, prepared: PreparedRequest) -> Job:
    """Queue the request; 429 when the queue is full, 503 when the engine is not (or no longer) ready."""
    job = Job(request=prepared.generation)
    try:
        engine.submit(job)
    except QueueFullError:
        raise E.queue_full(engine.max_queue) from None
    except NotReadyError:
        raise E.loading() from None
    return job


async def complete(request: Request, engine: Engine, prepared: PreparedRequest, fmt: Formatter) -> Any:
    """Answer ``prepared``: a chat.completion / text_completion body, or a :class:`JobStream`."""
    job = submit(engine, prepared)
    chunks = job.chunks().__aiter__()
    watcher = asyncio.create_task(_watch_disconnect(request, engine, job))
    handed_off = False
    try:
        try:  # wait for the first chunk: an error before any output is still a proper HTTP error
            first: GenerationChunk | None = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        if prepared.stream:
            watcher.cancel()  # StreamingResponse watches for the disconnect itself
            handed_off = True
            return JobStream(
                _sse(engine, job, fmt, prepared, first, chunks), on_close=lambda: engine.cancel(job)
            )
        return await _full(prepared, fmt, first, chunks)
    except MmtError as exc:
        raise E.from_mmt_error(exc, "messages" if prepared.chat else "prompt") from None
    except (E.APIError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("generation failed")
        raise E.internal(exc) from None
    finally:
        if not handed_off:
            watcher.cancel()
            engine.cancel(job)  # no-op when it finished; frees the slot when we bail out early


async def _full(
    prepared: PreparedRequest, fmt: Formatter, first: GenerationChunk | None,
    chunks: AsyncIterator[GenerationChunk],
) -> JSONResponse | dict[str, Any]:  # fmt: skip
    text_parts = [prepared.echo]
    kept: list[GenerationChunk] = []
    last = first
    if first is not None:
        text_parts.append(first.text)
        kept.append(first)
        async for c in chunks:
            text_parts.append(c.text)
            kept.append(c)
            last = c
    completion = int(last.generation_tokens) if last is not None else 0
    prompt_n = (
        int(last.prompt_tokens)
        if last is not None and last.prompt_tokens
        else len(prepared.generation.prompt)
    )
    finish = last.finish_reason if last is not None else "stop"
    logprob_chunks = kept if prepared.n_logprobs is not None else []
    return fmt.full("".join(text_parts), logprob_chunks, finish, prompt_n, completion)


async def _sse(
    engine: Engine, job: Job, fmt: Formatter, prepared: PreparedRequest, first: GenerationChunk | None,
    chunks: AsyncIterator[GenerationChunk],
) -> AsyncIterator[bytes]:  # fmt: skip
    finish: str | None = None
    completion = 0
    prompt_n = len(prepared.generation.prompt)
    echo, include_usage = prepared.echo, prepared.include_usage
    offset = len(echo)
    try:
        if prepared.chat:
            yield sse(fmt.chunk("", [], first=True, with_usage=include_usage))
        elif echo:
            yield sse(fmt.chunk(echo, [], with_usage=include_usage))
        pending: list[GenerationChunk] = []  # logprob-carrying chunks whose text is still held back

        async def all_chunks() -> AsyncIterator[GenerationChunk]:
            if first is not None:
                yield first
                async for c in chunks:
                    yield c

        async for c in all_chunks():
            if fmt.top is not None:
                pending.append(c)
            if c.text:
                yield sse(fmt.chunk(c.text, pending, with_usage=include_usage, offset=offset))
                offset += len(c.text)
                pending = []
            finish = c.finish_reason or finish
            completion = int(c.generation_tokens)
            prompt_n = int(c.prompt_tokens) or prompt_n
        yield sse(fmt.chunk(None, pending, finish or "stop", with_usage=include_usage, offset=offset))
        if include_usage:
            yield sse(fmt.usage_chunk(prompt_n, completion))
        yield SSE_DONE
    except MmtError as exc:
        yield sse(E.from_mmt_error(exc, "messages" if prepared.chat else "prompt").body())
        yield SSE_DONE
    except Exception as exc:
        log.exception("generation failed mid-stream")
        yield sse(E.internal(exc).body())
        yield SSE_DONE
    finally:
        engine.cancel(job)  # client gone (generator closed / cancelled) or done: free the worker now
