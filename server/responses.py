"""Response bodies in OpenAI's shapes: chat.completion(.chunk), text_completion, logprobs, usage."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import mmt_mlx

SYSTEM_FINGERPRINT = f"mmt_mlx-{mmt_mlx.__version__}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens taken from the prompt cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class TokenText:
    """Decodes single token ids for logprobs (cached: the same ids recur in top-k lists)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        s = self._cache.get(token)
        if s is None:
            try:
                s = self.tokenizer.decode([token])
            except Exception:  # noqa: BLE001 - a special or out-of-range id: show it, don't fail the request
                s = f"<{token}>"
            if len(self._cache) < 100_000:
                self._cache[token] = s
        return s


def _has_logprob(chunk: Any) -> bool:
    return getattr(chunk, "token", None) is not None and getattr(chunk, "logprob", None) is not None


def chat_logprobs(chunks: Iterable[Any], top_n: int, text: TokenText) -> list[dict[str, Any]]:
    """OpenAI chat ``logprobs.content``: one entry per generated token."""
    out = []
    for c in chunks:
        if not _has_logprob(c):
            continue
        s = text(c.token)
        tops = []
        for tid, lp in (c.top_logprobs or [])[:top_n]:
            t = text(int(tid))
            tops.append({"token": t, "logprob": float(lp), "bytes": list(t.encode("utf-8"))})
        out.append({"token": s, "logprob": float(c.logprob), "bytes": list(s.encode("utf-8")),
                    "top_logprobs": tops})  # fmt: skip
    return out


def completion_logprobs(
    chunks: Iterable[Any], top_n: int, text: TokenText, offset: int = 0
) -> dict[str, Any]:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top: list[dict[str, float]] = []
    offsets: list[int] = []
    for c in chunks:
        if not _has_logprob(c):
            continue
        s = text(c.token)
        tokens.append(s)
        token_logprobs.append(float(c.logprob))
        top.append({text(int(tid)): float(lp) for tid, lp in (c.top_logprobs or [])[:top_n]})
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top if top_n > 0 else None,
        "text_offset": offsets,
    }


class Formatter:
    """Builds the bodies of one response (same id / created / model for all its stream chunks)."""

    def __init__(self, chat: bool, model: str, tokenizer: Any, top_logprobs: int | None) -> None:
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.top = top_logprobs  # None: no logprobs
        self.text = TokenText(tokenizer)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT}  # fmt: skip

    def _logprobs(self, chunks: list[Any], offset: int = 0) -> dict[str, Any] | None:
        if self.top is None:
            return None
        if self.chat:
            return {"content": chat_logprobs(chunks, self.top, self.text), "refusal": None}
        return completion_logprobs(chunks, self.top, self.text, offset)

    # -- whole responses -------------------------------------------------------------------------------

    def full(self, text: str, chunks: list[Any], finish_reason: str | None, prompt_tokens: int,
             completion_tokens: int, tool_calls: list[dict[str, Any]] | None = None,
             cached_tokens: int = 0) -> dict[str, Any]:  # fmt: skip
        finish = "tool_calls" if tool_calls else finish_reason or "stop"
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": None if tool_calls else text,
                                       "refusal": None}  # fmt: skip
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": 0, "message": message, "logprobs": self._logprobs(chunks),
                      "finish_reason": finish}  # fmt: skip
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(chunks), "finish_reason": finish}
            body = self._head("text_completion")
        body["choices"] = [choice]
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body

    # -- stream chunks -------------------------------------------------------------------------------------

    def chunk(self, text: str | None, chunks: list[Any], finish_reason: str | None = None, *,
              first: bool = False, with_usage: bool = False, offset: int = 0) -> dict[str, Any]:  # fmt: skip
        """One stream event: ``text`` (None for the closing event that only carries finish_reason)."""
        if self.chat:
            body = self._head("chat.completion.chunk")
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(chunks) if chunks else None,
                      "finish_reason": finish_reason}  # fmt: skip
        else:
            body = self._head("text_completion")
            choice = {"index": 0, "text": text or "",
                      "logprobs": self._logprobs(chunks, offset) if chunks else None,
                      "finish_reason": finish_reason}  # fmt: skip
        body["choices"] = [choice]
        if with_usage:
            body["usage"] = None
        return body

    def tool_call_chunk(self, index: int, call: dict[str, Any], with_usage: bool = False) -> dict[str, Any]:
        """One stream event carrying a whole tool call (id, name and all its arguments)."""
        body = self._head("chat.completion.chunk")
        delta = {"tool_calls": [dict(call, index=index)]}
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
    ) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body
