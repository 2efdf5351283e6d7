"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through :class:`APIError`, so a client library (``openai``) maps it to
its usual exception (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 413, 429
RateLimitError, 503...). A bad request never becomes a 500: pydantic validation errors, malformed JSON and
:class:`mmt_mlx.errors.MmtError` raised while preparing a prompt are all 400s.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmt_mlx.errors import ContextLengthError, EmptyPromptError, MmtError, PromptError, TokenIdError

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error to send to the client as an OpenAI error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str) -> APIError:
    return APIError(
        401, message, type=INVALID_REQUEST, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")


def queue_full(max_queue: int) -> APIError:
    return APIError(
        429,
        f"The server is busy: {max_queue} request(s) are already waiting. Retry later.",
        type=RATE_LIMIT,
        code="queue_full",
        headers={"Retry-After": "1"},
    )


def loading() -> APIError:
    return APIError(
        503, "The model is still loading; retry shortly.", type=SERVER_ERROR, code="model_loading",
        headers={"Retry-After": "1"},
    )  # fmt: skip


def load_failed(message: str) -> APIError:
    return APIError(503, f"The model failed to load: {message}", type=SERVER_ERROR, code="model_load_failed")


def internal(exc: BaseException) -> APIError:
    """A failure of the server itself (a bug, a broken model): 500, named but without a traceback."""
    return APIError(500, f"Generation failed: {type(exc).__name__}: {exc}", type=SERVER_ERROR)


def from_mmt_error(exc: MmtError, param: str | None = None) -> APIError:
    """A user-input error raised by the runtime -> 400, by the error's type. ``param``: the request field
    the prompt came from ("messages" or "prompt")."""
    if isinstance(exc, ContextLengthError):
        field = param or "prompt"
        return invalid_request(
            f"This model's maximum context length is {exc.context_length} tokens. However, your {field} "
            f"resulted in {exc.prompt_tokens} tokens. Please reduce the length of the {field}.",
            field, "context_length_exceeded",
        )  # fmt: skip
    if isinstance(exc, EmptyPromptError):
        return invalid_request("The prompt is empty.", param)
    if isinstance(exc, TokenIdError):
        return invalid_request(str(exc), exc.field)
    if isinstance(exc, PromptError):
        return invalid_request(str(exc) or "Invalid prompt.", param)
    return invalid_request(str(exc) or type(exc).__name__)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic names union members / function validators in loc (e.g. "str", "list[str]"): drop them
    parts = [p for p in parts if not p.startswith(("function-", "list[", "dict[", "tagged-union["))]
    parts = [p for p in parts if p not in ("str", "int", "float", "bool", "none", "list", "dict")]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """Convert pydantic's error list into one readable OpenAI 400 (the first error names ``param``)."""
    errors = exc.errors()
    if not errors:
        return invalid_request("Invalid request body.")
    messages = []
    first_param: str | None = None
    for err in errors[:5]:
        param = _loc_to_param(tuple(err.get("loc", ())))
        if first_param is None:
            first_param = param
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        messages.append(f"'{param}': {msg}" if param else msg)
    more = f" (and {len(errors) - 5} more errors)" if len(errors) > 5 else ""
    return invalid_request("Invalid request: " + "; ".join(messages) + more, param=first_param)


def install_handlers(app: FastAPI) -> None:
    """Make every error path return an OpenAI error object."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(ValidationError)
    async def _pyd_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(MmtError)
    async def _mmt(_: Request, exc: MmtError) -> JSONResponse:
        return from_mmt_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"Unknown URL: {request.method} {request.url.path}", type=NOT_FOUND,
                           code="unknown_url")  # fmt: skip
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                           code="method_not_allowed")  # fmt: skip
        else:
            err = APIError(exc.status_code, str(exc.detail), type=INVALID_REQUEST if exc.status_code < 500
                           else SERVER_ERROR)  # fmt: skip
        resp = err.response()
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return APIError(
            500, f"Internal server error: {type(exc).__name__}: {exc}", type=SERVER_ERROR
        ).response()
