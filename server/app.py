"""The OpenAI-compatible HTTP app: ``create_app`` (FastAPI factory) and ``serve`` (what ``mmt serve`` runs).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models[/{id}]``,
``GET /health`` (503 while the model loads, then 200) and ``GET /metrics`` (Prometheus text).
Generation runs in the :class:`~mmt_mlx.server.engine.Engine` worker thread, one request at a time; this
module only parses, tokenizes, queues and formats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mmt_mlx.errors import MmtError

from . import errors as E
from .engine import Engine, GenerateFn, Job, NotReadyError, QueueFullError
from .metrics import CONTENT_TYPE, Metrics
from .middleware import GuardMiddleware
from .responses import SSE_DONE, Formatter, sse
from .schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("mmt_mlx.server")

MAX_BODY_BYTES = 4 * 1024 * 1024
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy /v1/completions endpoint
OWNER = "mmt_mlx"


def _served_names(lm: Any, aliases: Iterable[str]) -> list[str]:
    """The names a request's ``model`` field may use (lowercased): the model's name, its registry aliases,
    its path and file name, and the extra aliases given to create_app."""
    raw_names = [getattr(lm, "name", None), getattr(lm, "path", None), *aliases]
    try:
        from mmt_mlx.registry import ALIASES

        raw_names += [alias for alias, canonical in ALIASES.items() if canonical == lm.name]
    except ImportError:
        pass
    names: list[str] = []
    for raw in raw_names:
        if not raw:
            continue
        raw = str(raw)
        base = os.path.basename(raw.rstrip("/"))
        stem = base.split(".")[0] if "." in base else base
        for n in (raw, base, stem):
            if n and n.lower() not in names:
                names.append(n.lower())
    return names


def _vocab_size(lm: Any) -> int | None:
    tok = lm.tokenizer
    for obj, attr in ((tok, "vocab_size"), (getattr(lm.model, "args", None), "vocab_size")):
        v = getattr(obj, attr, None) if obj is not None else None
        if isinstance(v, int) and v > 0:
            return v
    try:
        return len(tok)
    except TypeError:
        return None


def _encode_templated(tok: Any, text: str) -> list[int]:
    """Token ids of a rendered chat template: control tokens written by the template become their ids, and
    the tokenizer adds its default BOS unless the template already starts with it."""
    return list(tok.encode(text))


def _sampling(req: ChatCompletionRequest | CompletionRequest) -> Any:
    from mmt_mlx.sample import SamplingParams

    kw: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):  # fmt: skip
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.seed is not None:
        kw["seed"] = req.seed % 2**64  # OpenAI seeds are int64 (maybe negative); MLX keys take uint64
    if req.top_p is not None and req.top_p <= 0:
        kw["top_p"] = 1e-9  # OpenAI accepts 0: only the most likely token survives
    if req.top_k is not None:
        kw["top_k"] = max(req.top_k, 0)  # -1 (vLLM's "disabled") == 0
    bias = req.token_bias()
    if bias:
        kw["logit_bias"] = bias
    return SamplingParams(**kw)


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past ``limit`` bytes (counted while reading, so chunked bodies are capped too)."""
    size = 0
    parts: list[bytes] = []
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise E.body_too_large(limit)
        parts.append(part)
    raw = b"".join(parts)
    if not raw.strip():
        raise E.invalid_request("The request body is empty: expected a JSON object.")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise E.invalid_request("The request body is not valid UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise E.invalid_request(f"Malformed JSON in the request body: {exc}") from None
    if not isinstance(body, dict):
        raise E.invalid_request("The request body must be a JSON object.")
    return body


class _JobStream(StreamingResponse):
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


def create_app(
    loader: Callable[[], Any],
    api_key: str | None = None,
    max_queue: int = 16,
    *,
    aliases: Iterable[str] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    generate_fn: GenerateFn | None = None,
) -> FastAPI:
    """An app serving the model ``loader()`` returns; loading runs in the generation thread at startup.

    ``max_queue``: requests that may wait behind the one being generated (more get 429).
    ``aliases``: extra names accepted in the ``model`` field. ``generate_fn`` replaces
    ``mmt_mlx.generate.stream_generate`` (tests, benchmarks).
    """
    metrics = Metrics()
    engine = Engine(loader, max_queue=max_queue, metrics=metrics, generate_fn=generate_fn)
    alias_list = [a for a in aliases if a]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="mmt_mlx", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.engine = engine
    app.state.metrics = metrics
    E.install_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    def ready_model() -> Any:
        if engine.state == "failed":
            raise E.load_failed(str(engine.error))
        if not engine.ready:
            raise E.loading()
        return engine.lm

    def check_model(lm: Any, requested: str | None) -> None:
        if requested is None:
            return
        if requested.lower() not in _served_names(lm, alias_list):
            raise E.model_not_found(requested)

    def model_card(lm: Any) -> dict[str, Any]:
        return {"id": lm.name, "object": "model", "created": int(engine.loaded_at), "owned_by": OWNER,
                "context_length": int(lm.context_length)}  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.state == "ready":
            return JSONResponse({"status": "ok", "model": engine.lm.name})
        if engine.state == "failed":
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        name = engine.lm.name if engine.ready else None
        return PlainTextResponse(metrics.render(name, engine.ready), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(ready_model())]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        lm = ready_model()
        check_model(lm, model_id)
        return model_card(lm)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _read_json(request, max_body_bytes)
        return await generate(request, ChatCompletionRequest.model_validate(body))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _read_json(request, max_body_bytes)
        return await generate(request, CompletionRequest.model_validate(body))

    def prepare(lm: Any, req: ChatCompletionRequest | CompletionRequest) -> tuple[list[int], str]:
        """Prompt token ids (and the echo text for completions); runs in a thread (tokenizing is CPU)."""
        tok = lm.tokenizer
        if isinstance(req, ChatCompletionRequest):
            messages = [m.for_template() for m in req.messages]
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
            return _encode_templated(tok, text), ""
        if isinstance(req.prompt, str):
            return list(tok.encode(req.prompt)), req.prompt if req.echo else ""
        ids = [int(t) for t in req.prompt]
        vocab = _vocab_size(lm)
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise E.invalid_request(
                f"prompt token id {bad[0]} is out of the vocabulary (0..{vocab}).", "prompt"
            )
        return ids, tok.decode(ids) if req.echo else ""

    async def generate(request: Request, req: ChatCompletionRequest | CompletionRequest) -> Any:
        chat = isinstance(req, ChatCompletionRequest)
        param = "messages" if chat else "prompt"
        lm = ready_model()
        check_model(lm, req.model)
        bias = req.token_bias()
        if bias:
            vocab = _vocab_size(lm)
            bad = [t for t in bias if vocab is not None and t >= vocab]
            if bad:
                raise E.invalid_request(f"logit_bias token id {bad[0]} is out of the vocabulary (0..{vocab}).",
                                        "logit_bias")  # fmt: skip
        try:
            ids, echo = await run_in_threadpool(prepare, lm, req)
        except MmtError as exc:
            raise E.from_mmt_error(exc) from None
        ctx = int(lm.context_length)
        if not ids:
            raise E.invalid_request("The prompt is empty.", param)
        if len(ids) >= ctx:
            raise E.invalid_request(
                f"This model's maximum context length is {ctx} tokens. However, your {param} resulted in "
                f"{len(ids)} tokens. Please reduce the length of the {param}.", param, "context_length_exceeded",
            )  # fmt: skip
        wanted = req.max_new_tokens()
        if wanted is None:
            wanted = ctx - len(ids) if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        max_tokens = max(1, min(wanted, ctx - len(ids)))  # clamped to the context left
        n_lp = req.n_logprobs()
        job = Job(prompt=ids, max_tokens=max_tokens, sampling=_sampling(req), stop=req.stop_list(),
                  logprobs=max(n_lp, 1) if n_lp is not None else 0)  # fmt: skip
        try:
            engine.submit(job)
        except QueueFullError:
            raise E.queue_full(engine.max_queue) from None
        except NotReadyError:
            raise E.loading() from None

        fmt = Formatter(chat, lm.name, lm.tokenizer, n_lp)
        chunks = job.chunks().__aiter__()
        watcher = asyncio.create_task(_watch_disconnect(request, engine, job))
        handed_off = False
        try:
            try:  # wait for the first chunk: an error before any output is still a proper HTTP error
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = None
            if req.stream:
                watcher.cancel()  # StreamingResponse watches for the disconnect itself
                handed_off = True
                stream = _sse(engine, job, fmt, first, chunks, echo, len(ids), req.include_usage(), chat)
                return _JobStream(stream, on_close=lambda: engine.cancel(job))
            text_parts = [echo]
            kept: list[Any] = []
            last = first
            if first is not None:
                text_parts.append(first.text)
                kept.append(first)
                async for c in chunks:
                    text_parts.append(c.text)
                    kept.append(c)
                    last = c
            completion = int(last.generation_tokens) if last is not None else 0
            prompt_n = int(last.prompt_tokens) if last is not None and last.prompt_tokens else len(ids)
            finish = last.finish_reason if last is not None else "stop"
            return fmt.full(
                "".join(text_parts), kept if n_lp is not None else [], finish, prompt_n, completion
            )
        except MmtError as exc:
            raise E.from_mmt_error(exc) from None
        except (E.APIError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("generation failed")
            raise E.APIError(
                500, f"Generation failed: {type(exc).__name__}: {exc}", type=E.SERVER_ERROR
            ) from None
        finally:
            if not handed_off:
                watcher.cancel()
                engine.cancel(job)  # no-op when it finished; frees the slot when we bail out early

    async def _sse(engine: Engine, job: Job, fmt: Formatter, first: Any, chunks: AsyncIterator[Any], echo: str,
                   prompt_n: int, include_usage: bool, chat: bool) -> AsyncIterator[bytes]:  # fmt: skip
        finish: str | None = None
        completion = 0
        offset = len(echo)
        try:
            if chat:
                yield sse(fmt.chunk("", [], first=True, with_usage=include_usage))
            elif echo:
                yield sse(fmt.chunk(echo, [], with_usage=include_usage))
            pending: list[Any] = []  # logprob-carrying chunks whose text is still held back

            async def all_chunks() -> AsyncIterator[Any]:
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
            yield sse(E.from_mmt_error(exc).body())
            yield SSE_DONE
        except Exception as exc:
            log.exception("generation failed mid-stream")
            err = E.APIError(500, f"Generation failed: {type(exc).__name__}: {exc}", type=E.SERVER_ERROR)
            yield sse(err.body())
            yield SSE_DONE
        finally:
            engine.cancel(job)  # client gone (generator closed / cancelled) or done: free the worker now

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MmtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    max_queue: int = 16,
) -> None:
    """Serve ``model`` (None: the default model) until interrupted; raises MmtError if it fails to load."""
    import threading

    import uvicorn

    from mmt_mlx.loader import load_model

    if max_queue < 0:
        raise MmtError("max_queue must be >= 0")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this port can use the model", host
        )
    app = create_app(lambda: load_model(model), api_key=api_key, max_queue=max_queue,
                     aliases=[model] if model else [])  # fmt: skip
    engine: Engine = app.state.engine
    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def stop_if_load_fails() -> None:
        engine.loaded.wait()
        if engine.state == "failed":
            server.should_exit = True

    threading.Thread(target=stop_if_load_fails, name="mmt-load-watch", daemon=True).start()
    print(
        f"mmt serve: loading {model or 'the default model'}; OpenAI API at http://{host}:{port}/v1",
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if engine.state == "failed":
        err = engine.error
        if isinstance(err, MmtError):
            raise err
        raise MmtError(f"the model failed to load: {type(err).__name__}: {err}")
