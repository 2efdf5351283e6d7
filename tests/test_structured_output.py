"""Structured output and tool calls through a live server and the official `openai` client.

The model has random weights: left alone it never writes JSON. With the grammar every answer must still
parse and validate against its schema, over many seeds, streamed or not."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageToolCall
from server_helpers import serve_module

from mmt_mlx.testing import tiny_model

M = "tiny-llama"  # the served model's name
CONTEXT = 2048  # the tool list makes prompts longer than the tiny models' default context


def _model():
    return tiny_model(max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def live():
    yield from serve_module(_model)


@pytest.fixture(scope="module")
def client(live):
    return live.client()


MSGS = [{"role": "user", "content": "Describe a person as JSON."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer",
                                                                               "minimum": 10000,
                                                                               "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}  # fmt: skip

SCHEMAS = {
    "person": PERSON,
    "list_of_points": {
        "type": "array",
        "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                   "y": {"type": "integer", "minimum": -5, "maximum": 5}},
                  "required": ["x", "y"], "additionalProperties": False},
        "minItems": 2, "maxItems": 4,
    },
    "choice": {"enum": ["red", "green", "blue"]},
}  # fmt: skip


def _json_schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_over_many_seeds_streamed_and_not(client, name):
    schema = SCHEMAS[name]
    fmt = _json_schema_format(name, schema)
    for seed in range(8):
        kw = dict(model=M, messages=MSGS, max_tokens=300, temperature=1.0, seed=seed, response_format=fmt)
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        value = json.loads(r.choices[0].message.content)
        jsonschema.validate(value, schema)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            **kw, stream=True) if c.choices)  # fmt: skip
        assert streamed == r.choices[0].message.content


def test_json_object_mode_chat_and_completions(client):
    for seed in range(6):
        r = client.chat.completions.create(
            model=M, messages=MSGS, max_tokens=200, temperature=0.7, seed=seed,
            response_format={"type": "json_object"},
        )  # fmt: skip
        if (
            r.choices[0].finish_reason == "stop"
        ):  # a free object may outgrow any budget; a finished one parses
            assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = SCHEMAS["list_of_points"]
    c = client.completions.create(model=M, prompt="Points:", max_tokens=200, seed=1, temperature=1.0,
                                  extra_body={"response_format": _json_schema_format("p", schema)})  # fmt: skip
    jsonschema.validate(json.loads(c.choices[0].text), schema)
    s = client.completions.create(model=M, prompt="Points:", max_tokens=200, seed=1, temperature=1.0,
                                  stream=True,
                                  extra_body={"response_format": _json_schema_format("p", schema)})  # fmt: skip
    assert "".join(x.choices[0].text for x in s if x.choices) == c.choices[0].text


def test_regex_and_lark_extensions(client):
    r = client.chat.completions.create(
        model=M,
        messages=MSGS,
        max_tokens=40,
        temperature=1.0,
        seed=3,
        response_format={"type": "regex", "regex": r"[0-9]{3}-[a-z]{2,4}"},
    )
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", r.choices[0].message.content)
    lark = 'start: "yes" | "no" | "maybe"'
    r = client.chat.completions.create(
        model=M,
        messages=MSGS,
        max_tokens=10,
        temperature=1.0,
        seed=5,
        response_format={"type": "lark", "lark": lark},
    )
    assert r.choices[0].message.content in ("yes", "no", "maybe")


BAD_FORMATS = [
    (_json_schema_format("x", {"type": "nope"}), "nope"),
    (_json_schema_format("x", {"type": "string", "pattern": "(("}), "(("),
    (_json_schema_format("x", {"type": "string", "format": "not-a-format"}), "not-a-format"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ({"type": "regex", "regex": "(("}, "regex"),
    ({"type": "lark", "lark": "start: undefined_rule"}, "undefined_rule"),
    ({"type": "xml"}, "type"),
]


@pytest.mark.parametrize("fmt,needle", BAD_FORMATS)
def test_invalid_formats_are_400s_in_openai_shape(client, fmt, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=M, messages=MSGS, max_tokens=5, response_format=fmt)
    err = info.value.body
    assert info.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert needle in err["message"] and err["param"].startswith("response_format")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                        "unit": {"enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}  # fmt: skip
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                        "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                       "required": ["a", "b"], "additionalProperties": False},
    },
}  # fmt: skip
TOOLS = [WEATHER, ADD]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls: list[ChatCompletionMessageToolCall], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert isinstance(call, ChatCompletionMessageToolCall) and call.type == "function"
        assert call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def _streamed_calls(client: openai.OpenAI, **kw: Any) -> tuple[list[dict[str, Any]], str | None]:
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for c in client.chat.completions.create(**kw, stream=True):
        if not c.choices:
            continue
        for d in c.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            slot["name"] += d.function.name or ""
            slot["arguments"] += d.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_calls_required_and_named(client, choice):
    names = {"add"} if isinstance(choice, dict) else {"get_weather", "add"}
    for seed in range(6):
        kw = dict(model=M, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=300, temperature=1.0,
                  seed=seed)  # fmt: skip
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        _check_calls(msg.tool_calls, names)
        if isinstance(choice, dict):
            assert len(msg.tool_calls) == 1
        streamed, finish = _streamed_calls(client, **kw)
        assert finish == "tool_calls"
        assert [(c["name"], c["arguments"]) for c in streamed] == [
            (c.function.name, c.function.arguments) for c in msg.tool_calls
        ]


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(6):
        r = client.chat.completions.create(model=M, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=300, temperature=1.0,
                                           seed=seed)  # fmt: skip
        assert len(r.choices[0].message.tool_calls) == 1


def test_auto_text_or_call_and_none(client, live):
    lm = _model()
    lt = lm.tokenizer.encode("<", add_bos=False)[0]
    # auto: the random model answers in text; pushed towards "<" it calls a tool instead
    text = client.chat.completions.create(model=M, messages=ASK, tools=TOOLS, max_tokens=20, seed=1)
    assert text.choices[0].message.tool_calls is None and not text.choices[0].message.content.startswith("<")
    call = client.chat.completions.create(model=M, messages=ASK, tools=TOOLS, max_tokens=300, seed=1,
                                          temperature=1.0, logit_bias={str(lt): 100})  # fmt: skip
    assert call.choices[0].finish_reason == "tool_calls"
    _check_calls(call.choices[0].message.tool_calls, set(SCHEMA_OF))
    for answer, bias in ((text, None), (call, {str(lt): 100})):  # streamed: the same answer, as deltas
        kw = dict(model=M, messages=ASK, tools=TOOLS, seed=1)
        kw.update(dict(max_tokens=300, temperature=1.0, logit_bias=bias) if bias else dict(max_tokens=20))
        calls, finish = _streamed_calls(client, **kw)
        want = answer.choices[0].message.tool_calls or []
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in want
        ]
        assert finish == answer.choices[0].finish_reason
    none = client.chat.completions.create(model=M, messages=ASK, tools=TOOLS, tool_choice="none",
                                          max_tokens=10, logit_bias={str(lt): 100})  # fmt: skip
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"


def test_tool_results_go_back_to_the_model(client):
    first = client.chat.completions.create(model=M, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=300, temperature=1.0, seed=2)  # fmt: skip
    msg = first.choices[0].message
    history = [*ASK, msg.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": '{"temp": 21}'} for c in msg.tool_calls]
    r = client.chat.completions.create(model=M, messages=history, tools=TOOLS, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > first.usage.prompt_tokens  # the calls and results are in the prompt


BAD_TOOLS = [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "bad name!"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools",
     "nope"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice",
     "missing"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "required"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"functions": [{"name": "f"}]}, "functions", "tools"),
]  # fmt: skip


@pytest.mark.parametrize("extra,param,needle", BAD_TOOLS)
def test_invalid_tools_are_400s(live, extra, param, needle):
    body = {"model": M, "messages": ASK, "max_tokens": 5, **extra}
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]
    assert (err["param"] or "").startswith(param)
