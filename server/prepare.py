"""From an HTTP request to the runtime's request: read the JSON body, parse it into the OpenAI schema, check
the model name, tokenize, and build one validated :class:`~mmt_mlx.request.GenerationRequest`.

The checks on the prompt and the token budget are the runtime's own (``make_request``); this module only
adds what belongs to the OpenAI API (its defaults, its field names) and maps the runtime's typed errors to
400s naming the right field. Whatever a later feature reads from the body (``response_format``, ``tools``)
is turned into runtime request fields here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from mmt_mlx.errors import MmtError
from mmt_mlx.request import GenerationRequest, make_request
from mmt_mlx.sample import SamplingParams

from . import errors as E
from .schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy /v1/completions endpoint

ApiRequest = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready to queue: the runtime's part and what the response formatting needs."""

    generation: GenerationRequest
    chat: bool  # /v1/chat/completions (else /v1/completions)
    echo: str  # text to put before the completion (completions with echo=true), else ""
    n_logprobs: int | None  # None: no logprobs; k >= 0: the sampled token's and k alternatives
    stream: bool
    include_usage: bool  # a final usage chunk in the stream


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes (counted while reading: chunked bodies too)."""
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


def served_names(lm: LoadedModel, aliases: Iterable[str]) -> list[str]:
    """The names a request's ``model`` field may use (lowercased): the model's name, its registry aliases,
    its path and file name, and the extra aliases given to create_app."""
    from mmt_mlx.registry import ALIASES

    raw_names = [lm.name, lm.path, *aliases]
    raw_names += [alias for alias, canonical in ALIASES.items() if canonical == lm.name]
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


def check_model(lm: LoadedModel, requested: str | None, aliases: Iterable[str]) -> None:
    """404 unless ``requested`` (when given) names the served model."""
    if requested is not None and requested.lower() not in served_names(lm, aliases):
        raise E.model_not_found(requested)


def sampling_params(req: ApiRequest) -> SamplingParams:
    """OpenAI's sampling fields (and the common extensions) as the runtime's parameters."""
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


def _prompt_ids(lm: LoadedModel, req: ApiRequest) -> tuple[list[int], str]:
    """Prompt token ids and the echo text. A chat template's control tokens become their ids, and the
    tokenizer adds its default BOS unless the template already starts with it."""
    tok = lm.tokenizer
    if isinstance(req, ChatCompletionRequest):
        messages = [m.for_template() for m in req.messages]
        return list(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))), ""
    if isinstance(req.prompt, str):
        return list(tok.encode(req.prompt)), req.prompt if req.echo else ""
    ids = [int(t) for t in req.prompt]
    return ids, ""


def prepare(lm: LoadedModel, req: ApiRequest) -> PreparedRequest:
    """Tokenize and validate ``req`` for ``lm`` (CPU work: run it in a thread). Raises APIError (400)."""
    chat = isinstance(req, ChatCompletionRequest)
    param = "messages" if chat else "prompt"
    try:
        ids, echo = _prompt_ids(lm, req)
        max_tokens = req.max_new_tokens()
        if max_tokens is None and not chat:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS  # chat's default: the whole context left
        n_lp = req.n_logprobs()
        generation = make_request(
            lm, ids, max_tokens=max_tokens, sampling=sampling_params(req), stop=req.stop_list(),
            logprobs=max(n_lp, 1) if n_lp is not None else 0,
        )  # fmt: skip
        if isinstance(req, CompletionRequest) and req.echo and not isinstance(req.prompt, str):
            echo = lm.tokenizer.decode(ids)  # only once the ids are known to be in the vocabulary
    except MmtError as exc:
        raise E.from_mmt_error(exc, param) from None
    return PreparedRequest(generation, chat, echo, n_lp, bool(req.stream), req.include_usage())
