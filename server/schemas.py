"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types, unknown fields ignored).

Strict mode: ``"temperature": "0.5"`` or ``"stream": "yes"`` are 400s, as with OpenAI, instead of being
coerced. Features the runtime cannot honour (n > 1, suffix, best_of > 1, legacy ``functions``) are refused
with a 400 that says so, never silently ignored. ``response_format`` takes OpenAI's ``text``,
``json_object`` and ``json_schema``, and two extensions: ``{"type": "regex", "regex": "..."}`` and
``{"type": "lark", "lark": "..."}`` (llguidance's Lark dialect).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: Any = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "regex", "lark"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = None
    lark: str | None = None

    @model_validator(mode="after")
    def _fields(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format json_schema needs json_schema.schema")
        if self.type in ("regex", "lark") and not getattr(self, self.type):
            raise ValueError(f"response_format type '{self.type}' needs a non-empty '{self.type}' string")
        return self


class ToolCallFunction(_Strict):
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, v: str) -> str:
        import json

        try:
            json.loads(v)
        except json.JSONDecodeError:
            raise ValueError("tool call arguments must be a JSON string") from None
        return v


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(v, list):
            for part in v:
                if part.type != "text":
                    raise ValueError(f"content part type '{part.type}' is not supported (text only)")
                if part.text is None:
                    raise ValueError("a text content part needs a 'text' string")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)

    def for_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        msg: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            msg["tool_calls"] = [_call_dict(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


def _call_dict(c: ToolCall) -> dict[str, Any]:
    import json

    return {"name": c.function.name, "arguments": json.loads(c.function.arguments)}


class _Common(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(1, ge=1, le=128)
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        stops = [s for s in stops if s]
        return stops or None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        for key, bias in v.items():
            try:
                tid = int(key)
            except ValueError:
                raise ValueError(
                    f"logit_bias keys must be token ids (integer strings), got '{key}'"
                ) from None
            if tid < 0:
                raise ValueError(f"logit_bias token id {tid} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias value for token {key} must be between -100 and 100, got {bias}")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"n={v} is not supported: this server returns exactly one choice (n=1)")
        return v

    def stop_list(self) -> list[str] | None:
        return self.stop  # type: ignore[return-value]  # normalised by the validator

    def token_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        return {int(k): float(b) for k, b in self.logit_bias.items()}

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("the legacy 'functions' field is not supported: send 'tools' instead")
        return v

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def n_logprobs(self) -> int | None:
        """None: no logprobs; k >= 0: the sampled token's logprob plus the top k alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(
                    f"{len(v)} prompts given: this server accepts exactly one prompt per request"
                )
            return v[0]
        return v  # a list of token ids

    @model_validator(mode="after")
    def _checks(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        if self.best_of is not None and self.best_of != 1:
            raise ValueError("best_of > 1 is not supported by this server")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported by this server")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def n_logprobs(self) -> int | None:
        return self.logprobs
