"""Tool (function) calling: tools in the prompt, a grammar that keeps every call well formed, and parsing.

Convention (used when the model's chat template has no `tools` support, which is the case of both built-in
models): a system message lists the tools as JSON and asks for calls written as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

one block per call, separated by a newline. Decoding is constrained by a Lark grammar (llguidance) whose
call blocks embed each tool's parameter schema, so every call parses and its arguments validate. With
``tool_choice="auto"`` the model may instead answer in free text, which then must not start with ``<``
(that first character is what tells text and calls apart). Tool results (``role: "tool"``) go back to the
model as ``<tool_response>`` user turns; an assistant turn's earlier calls as its ``<tool_call>`` blocks.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmt_mlx.constrain import JSON_OPTIONS, Grammar, GrammarError, compile_grammar, json_schema_grammar

if TYPE_CHECKING:
    from mmt_mlx.tokenizer import Tokenizer

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool


def parse_tools(tools: list[Any]) -> list[Tool]:
    """OpenAI's ``tools`` list as Tools; raises GrammarError naming the first bad entry."""
    out: list[Tool] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise GrammarError("tools", f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise GrammarError("tools", f"tools[{i}].function.name must match {_NAME.pattern}, got {name!r}")
        if any(x.name == name for x in out):
            raise GrammarError("tools", f"two tools are named {name!r}")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise GrammarError("tools", f"tools[{i}].function.parameters must be a JSON Schema object")
        try:
            json_schema_grammar(params)  # a bad schema is refused here, naming the problem
        except GrammarError as e:
            raise GrammarError("tools", f"tools[{i}].function.parameters: {e.problem}") from None
        out.append(Tool(name, str(fn.get("description") or ""), params, fn.get("strict") is True))
    if not out:
        raise GrammarError("tools", "tools must not be empty")
    return out


def choose(tools: list[Tool], tool_choice: Any) -> tuple[str, list[Tool]]:
    """The mode ("none", "auto", "required") and the tools that may be called for ``tool_choice``."""
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return tool_choice or "auto", tools
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        named = [t for t in tools if t.name == name]
        if not named:
            raise GrammarError("tool_choice", f"no tool named {name!r} in tools")
        return "required", named
    raise GrammarError(
        "tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def template_supports_tools(tok: Tokenizer) -> bool:
    return bool(tok.chat_template and re.search(r"\btools\b", tok.chat_template))


def system_prompt(tools: list[Tool]) -> str:
    listed = [
        {"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools
    ]  # fmt: skip
    return (
        "You can call these tools (the parameters are JSON Schemas):\n"
        + json.dumps(listed, ensure_ascii=False)
        + f'\nTo call a tool, answer only with {OPEN}{{"name": <tool name>, "arguments": <arguments object>}}'
        + f"{CLOSE}, one block per call. Otherwise answer normally."
    )


def prompt_messages(tok: Tokenizer, messages: list[dict[str, Any]], tools: list[Tool] | None) -> tuple[
    list[dict[str, Any]], dict[str, Any]
]:  # fmt: skip
    """Messages (and extra template variables) for the chat template: earlier tool calls and tool results in
    the convention's form, and the tools in a system message unless the template takes them itself."""
    native = tools is not None and template_supports_tools(tok)
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if m.get("role") == "assistant" and calls and not native:
            blocks = [f"{OPEN}{json.dumps({'name': c['name'], 'arguments': c['arguments']})}{CLOSE}"
                      for c in calls]  # fmt: skip
            m["content"] = "\n".join(filter(None, [m.get("content") or "", *blocks]))
        elif calls:
            m["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        if m.get("role") == "tool" and not native:
            name = m.pop("name", None)
            body = {"name": name, "content": m.get("content", "")} if name else {"content": m.get("content")}
            m = {"role": "user", "content": f"<tool_response>{json.dumps(body)}</tool_response>"}
        out.append(m)
    if tools is None:
        return out, {}
    if native:
        listed = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                    "parameters": t.parameters}} for t in tools]  # fmt: skip
        return out, {"tools": listed}
    if out and out[0].get("role") == "system":
        out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{system_prompt(tools)}")
    else:
        out.insert(0, {"role": "system", "content": system_prompt(tools)})
    return out, {}


def _embedded(schema: dict[str, Any], lenient: bool) -> str:
    return "%json " + json.dumps(dict(schema, **{"x-guidance": dict(JSON_OPTIONS, lenient=lenient)}))


def tool_grammar(
    tok: Tokenizer, tools: list[Tool], mode: str, parallel: bool, text_schema: dict[str, Any] | None = None
) -> Grammar:
    """The grammar of an answer: tool calls only (mode "required"), or free text / calls ("auto"). With
    ``text_schema`` (a response_format), the text alternative is JSON of that schema."""
    calls = {
        "anyOf": [
            {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
             "properties": {"name": {"const": t.name}, "arguments": t.parameters}}
            for t in tools
        ]
    }  # fmt: skip
    lenient = not all(t.strict for t in tools)
    lines = [
        "calls: call" + (' ("\\n" call)*' if parallel else ""),
        f"call: {json.dumps(OPEN)} {_embedded(calls, lenient)} {json.dumps(CLOSE)}",
    ]
    if mode == "required":
        lines.insert(0, "start: calls")
    elif text_schema is not None:
        lines.insert(0, f"start: {_embedded(text_schema, False)} | calls")
    else:
        lines.insert(0, "start: TEXT | calls")
        lines.append(r"TEXT: /[^<](.|\n)*/")  # free text cannot look like the start of a call
    return compile_grammar(tok, "lark", "\n".join(lines), lenient=lenient)


def parse_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls in an answer as OpenAI ``tool_calls`` (ids, name, arguments as a JSON string), or None when
    the answer is text. Raises ValueError if it starts like a call but is not one (cut short by max_tokens)."""
    if not text.startswith(OPEN):  # as the grammar: only a call starts with "<"
        return None
    out = []
    for body in _CALL.findall(text):
        call = json.loads(body)
        out.append({
            "id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
        })  # fmt: skip
    if not out:
        raise ValueError("the answer started a tool call but did not finish it")
    return out
