"""A pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection).

In order: count every HTTP request by endpoint and status (metrics), check the Bearer key on ``/v1/*`` when
an API key is set (401), refuse a declared body over the limit (413) before anything reads or parses it.
"""

from __future__ import annotations

import hmac
from typing import Any

from . import errors as E
from .metrics import Metrics

_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


def endpoint_label(path: str) -> str:
    """A bounded set of metric labels (no label per random 404 path)."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class GuardMiddleware:
    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            error = self._check(scope)
            if error is not None:
                await error.response()(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        finally:
            self.metrics.count_request(endpoint_label(scope.get("path", "")), status)

    def _check(self, scope: dict[str, Any]) -> E.APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path", "").startswith("/v1/"):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if not auth:
                return E.unauthorized(
                    "You didn't provide an API key. Pass it as an 'Authorization: Bearer <key>' header."
                )
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                return E.unauthorized("Incorrect API key provided.")
        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return E.invalid_request("Invalid Content-Length header.")
            if n > self.max_body_bytes:
                return E.body_too_large(self.max_body_bytes)
        return None
