"""Helpers for the server tests: a live uvicorn server on loopback, a slowed generator, gauge readers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import uvicorn

from mmt_mlx.generate import GenerationChunk, generate_request
from mmt_mlx.request import GenerationRequest


class LiveServer:
    """create_app(...) served by uvicorn in a background thread on a free loopback port."""

    def __init__(self, app: Any, wait_ready: bool = True) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            assert self.thread.is_alive(), "uvicorn exited"
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.time() < deadline, "model did not load"
            time.sleep(0.05)

    def client(self, api_key: str = "unused", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    @property
    def model(self) -> str:
        return httpx.get(self.url + "/health").json()["model"]

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def serve_module(model_factory: Callable[[], Any]) -> Iterator[LiveServer]:
    """The body of a module-scoped ``live`` fixture: ``yield from serve_module(factory)``."""
    from mmt_mlx.server.app import create_app

    s = LiveServer(create_app(model_factory))
    try:
        yield s
    finally:
        s.close()


def slowed(delay: float) -> Callable[..., Iterator[GenerationChunk]]:
    """generate_request, but each token takes at least `delay` seconds (to hold the worker busy)."""

    def gen(
        lm: Any, request: GenerationRequest, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationChunk]:
        for chunk in generate_request(lm, request, should_stop):
            time.sleep(delay)
            yield chunk

    return gen


def gauge(s: LiveServer, name: str) -> float:
    for line in s.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)
