"""The OpenAI-compatible HTTP app: ``create_app`` (FastAPI factory) and ``serve`` (what ``mmt serve`` runs).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models[/{id}]``,
``GET /health`` (503 while the model loads, then 200) and ``GET /metrics`` (Prometheus text).
This module wires the parts together: :mod:`.prepare` turns a body into the runtime's request,
:mod:`.completions` runs it on the :class:`~mmt_mlx.server.engine.Engine` (one worker thread) and answers.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from mmt_mlx.errors import MmtError

from . import errors as E
from .completions import complete
from .engine import Engine, GenerateFn
from .metrics import CONTENT_TYPE, Metrics
from .middleware import GuardMiddleware
from .prepare import ApiRequest, check_model, prepare, read_json
from .responses import Formatter
from .schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel

log = logging.getLogger("mmt_mlx.server")

MAX_BODY_BYTES = 4 * 1024 * 1024
OWNER = "mmt_mlx"


def create_app(
    loader: Callable[[], LoadedModel],
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
    ``mmt_mlx.generate.generate_request`` (tests, benchmarks).
    """
    metrics = Metrics()
    engine = Engine(
        loader, max_queue=max_queue, generate_fn=generate_fn, on_generation=metrics.record_generation
    )
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
    _add_status_routes(app, engine, metrics, alias_list)

    async def generate(request: Request, req: ApiRequest) -> Any:
        lm = _ready_model(engine)
        check_model(lm, req.model, alias_list)
        prepared = await run_in_threadpool(prepare, lm, req)  # tokenizing is CPU work
        fmt = Formatter(prepared.chat, lm.name, lm.tokenizer, prepared.n_logprobs)
        return await complete(request, engine, prepared, fmt)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_json(request, max_body_bytes)
        return await generate(request, ChatCompletionRequest.model_validate(body))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_json(request, max_body_bytes)
        return await generate(request, CompletionRequest.model_validate(body))

    return app


def _ready_model(engine: Engine) -> LoadedModel:
    """The loaded model; 503 while it loads or when loading failed."""
    if engine.state == "failed":
        raise E.load_failed(str(engine.error))
    if not engine.ready or engine.lm is None:
        raise E.loading()
    return engine.lm


def _add_status_routes(app: FastAPI, engine: Engine, metrics: Metrics, aliases: list[str]) -> None:
    """``/health``, ``/metrics`` and ``/v1/models[/{id}]``."""

    def model_card(lm: LoadedModel) -> dict[str, Any]:
        return {"id": lm.name, "object": "model", "created": int(engine.loaded_at), "owned_by": OWNER,
                "context_length": int(lm.context_length)}  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.state == "ready" and engine.lm is not None:
            return JSONResponse({"status": "ok", "model": engine.lm.name})
        if engine.state == "failed":
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def get_metrics() -> PlainTextResponse:
        name = engine.lm.name if engine.ready and engine.lm is not None else None
        text = metrics.render(engine.gauges(), name, engine.ready)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(_ready_model(engine))]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        lm = _ready_model(engine)
        check_model(lm, model_id, aliases)
        return model_card(lm)


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
