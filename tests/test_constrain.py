"""Constrained decoding without the server: the tokenizer bridge, grammar errors, the per-request processor on
a tiny random model, tool-call grammars and parsing, and `mmt generate --json-schema`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from mmt_mlx.cli import main
from mmt_mlx.constrain import GrammarConstraint, GrammarError, compile_grammar, ll_tokenizer
from mmt_mlx.generate import stream_generate
from mmt_mlx.sample import SamplingParams
from mmt_mlx.testing import smollm2_tokenizer, tiny_model
from mmt_mlx.tool_calls import choose, parse_calls, parse_tools, prompt_messages, tool_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "kind": {"enum": ["a", "b", "c"]},
        "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["id", "kind", "items", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def lm():
    return tiny_model(max_position_embeddings=1024)


def _generate(lm, grammar, seed: int, max_tokens: int = 200, **kw) -> tuple[str, str | None]:
    ids = lm.tokenizer.encode("Answer:")
    chunks = list(stream_generate(lm, ids, max_tokens=max_tokens, grammar=grammar,
                                  sampling=SamplingParams(temperature=1.0, seed=seed, **kw)))  # fmt: skip
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_token_bytes_match_the_tokenizer():
    tok = smollm2_tokenizer()
    ll = ll_tokenizer(tok)
    assert ll is ll_tokenizer(tok)  # built once per tokenizer
    assert ll.vocab_size == tok.vocab_size and set(ll.eos_tokens) == tok.eos_ids
    text = 'Caf\u00e9 {"k": [1, 2]} \u6f22\u5b57 \U0001f600'
    ids = tok.encode(text, add_bos=False)
    assert ll.decode_bytes(ids) == text.encode()
    assert all(ll.is_special_token(i) for i in tok.special_tokens.values())


@pytest.mark.parametrize(
    "kind,spec,needle",
    [
        ("json_schema", {"type": "nope"}, "nope"),
        ("json_schema", ["not", "a", "schema"], "must be an object"),
        ("json_schema", {"type": "string", "format": "no-such-format"}, "no-such-format"),
        ("json_schema", {"properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ("regex", "(unclosed", "unclosed"),
        ("lark", "start: missing_rule", "missing_rule"),
        ("lark", "", "non-empty"),
    ],
)
def test_bad_grammars_name_the_problem(kind, spec, needle):
    with pytest.raises(GrammarError, match=re.escape(needle)):
        compile_grammar(smollm2_tokenizer(), kind, spec)


def test_strict_false_ignores_unknown_formats():
    schema = {"type": "string", "format": "no-such-format"}
    compile_grammar(smollm2_tokenizer(), "json_schema", schema, lenient=True)


def test_random_model_always_writes_valid_json(lm):
    grammar = compile_grammar(lm.tokenizer, "json_schema", SCHEMA)
    for seed in range(10):
        text, finish = _generate(lm, grammar, seed)
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_mask_survives_bias_and_penalties(lm):
    # a huge bias on a token the grammar forbids must not bring it back
    brace = lm.tokenizer.encode("}", add_bos=False)[0]
    grammar = compile_grammar(lm.tokenizer, "regex", r"[0-9]{4}")
    text, finish = _generate(lm, grammar, 0, logit_bias={brace: 100.0}, repetition_penalty=1.3)
    assert re.fullmatch(r"[0-9]{4}", text) and finish == "stop"


def test_processor_interface(lm):
    """The constraint is a self-contained logits processor: (tokens, logits) -> logits, then advance."""
    tok = lm.tokenizer
    c = GrammarConstraint(tok, compile_grammar(tok, "regex", "(yes|no)!"))
    logits = mx.zeros((tok.vocab_size,))
    text, out = "", []
    while True:
        allowed = np.flatnonzero(np.array(mx.isfinite(c(out, logits)))).tolist()
        assert allowed and len(allowed) < 20
        words = [i for i in allowed if i not in tok.eos_ids]
        if not words:  # only the end of the answer is left
            break
        assert all(w in ("yes!", "no!") for w in (text + tok.decode([i]) for i in words) if "!" in w)
        c.advance(words[0])
        out.append(words[0])
        text += tok.decode([words[0]])
    assert text in ("yes!", "no!") and c.accepting
    with pytest.raises(GrammarError):
        c.advance(tok.encode("x", add_bos=False)[0])


TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 50}},
        "required": ["n"], "additionalProperties": False}}},
]  # fmt: skip


def test_tool_grammar_calls_parse(lm):
    tools = parse_tools(TOOLS)
    schemas = {t.name: t.parameters for t in tools}
    grammar = tool_grammar(lm.tokenizer, tools, "required", parallel=True)
    for seed in range(6):
        text, finish = _generate(lm, grammar, seed, max_tokens=400)
        calls = parse_calls(text)
        assert finish == "stop" and calls
        for call in calls:
            assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
            args = json.loads(call["function"]["arguments"])
            jsonschema.validate(args, schemas[call["function"]["name"]])


def test_tool_auto_text_never_starts_like_a_call(lm):
    tools = parse_tools(TOOLS)
    grammar = tool_grammar(lm.tokenizer, tools, "auto", parallel=False)
    for seed in range(4):
        text, _ = _generate(lm, grammar, seed, max_tokens=12)
        assert parse_calls(text) is None and not text.startswith("<")


def test_tool_choice_and_bad_tools():
    tools = parse_tools(TOOLS)
    assert choose(tools, None) == ("auto", tools)
    assert choose(tools, {"type": "function", "function": {"name": "count"}}) == ("required", [tools[1]])
    for bad in ("always", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(GrammarError, match="tool choice"):
            choose(tools, bad)
    for bad_tools, needle in [([], "empty"), ([{"type": "web"}], "tools\\[0\\]"),
                              ([TOOLS[0], TOOLS[0]], "two tools"),
                              ([{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}],
                               "parameters")]:  # fmt: skip
        with pytest.raises(GrammarError, match=needle):
            parse_tools(bad_tools)


def test_prompt_convention_renders_calls_and_results():
    tok = smollm2_tokenizer()
    tools = parse_tools(TOOLS)
    history = [
        {"role": "user", "content": "how many?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "count", "arguments": {"n": 3}}]},
        {"role": "tool", "content": "3 items", "tool_call_id": "call_1"},
    ]
    messages, extra = prompt_messages(tok, history, tools)
    assert extra == {} and messages[0]["role"] == "system" and '"lookup"' in messages[0]["content"]
    text = tok.apply_chat_template(messages)
    assert '<tool_call>{"name": "count", "arguments": {"n": 3}}</tool_call>' in text
    assert "<tool_response>" in text and "3 items" in text


def test_cli_json_schema(capsys, tmp_path: Path, tiny_gguf):
    path, _ = tiny_gguf["llama"]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"name": "x", "schema": SCHEMA}))  # OpenAI's wrapper is accepted
    code = main(["generate", "-m", path, "-n", "150", "--temp", "1", "--seed", "4",
                 "--json-schema", str(schema_file), "Give JSON:"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    jsonschema.validate(json.loads(out), SCHEMA)
    schema_file.write_text('{"type": "nope"}')
    assert main(["generate", "-m", path, "--json-schema", str(schema_file), "x"]) == 1
    assert "invalid json schema" in capsys.readouterr().err
    assert main(["generate", "-m", path, "--json-schema", str(tmp_path / "missing.json"), "x"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_hf_dir_tokenizer_gives_the_same_token_bytes(tmp_path: Path):
    from tokenizers import AddedToken, decoders

    from mmt_mlx.gguf_file import read_gguf_metadata
    from mmt_mlx.registry import builtin_path
    from mmt_mlx.tokenizer import _gguf_bpe, tokenizer_from_hf_dir

    meta = read_gguf_metadata(builtin_path("smollm2-135m-instruct"))
    hf = _gguf_bpe(meta, meta["tokenizer.ggml.tokens"])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t in meta["tokenizer.ggml.tokens"][:17]])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok, gguf_tok = tokenizer_from_hf_dir(tmp_path), smollm2_tokenizer()
    assert tok.piece_bytes[17:] == gguf_tok.piece_bytes[17:]
    grammar = compile_grammar(tok, "regex", "[a-z]{3}")  # and the bridge takes it
    assert grammar.kind == "regex"


@pytest.mark.slow
def test_gemma_sentencepiece_tokenizer_bridge():
    """Gemma 3's 262k SentencePiece vocabulary (byte pieces, U+2581 spaces, thousands of control tokens)."""
    from mmt_mlx.registry import builtin_path
    from mmt_mlx.tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(str(builtin_path("gemma3-270m")))
    ll = ll_tokenizer(tok)
    text = 'Caf\u00e9 {"k": [1, 2]}  \u6f22\u5b57 \U0001f600\n\tx'
    assert ll.decode_bytes(tok.encode(text, add_bos=False)) == text.encode()
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    c = GrammarConstraint(tok, compile_grammar(tok, "json_schema", schema))
    rng, out = np.random.default_rng(0), []
    for _ in range(20):
        t = int(mx.argmax(c(out, mx.array(rng.standard_normal(tok.vocab_size).astype(np.float32)))).item())
        if t in tok.eos_ids:
            break
        c.advance(t)
        out.append(t)
    jsonschema.validate(json.loads(tok.decode(out)), schema)


def test_template_with_tools_support_gets_them_natively():
    import copy

    tok = copy.copy(smollm2_tokenizer())
    tok.chat_template = (
        "{% if tools %}TOOLS={{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% for c in m.get('tool_calls', []) %}[call {{ c['function']['name'] }}]{% endfor %}\n{% endfor %}"
    )
    tools = parse_tools(TOOLS)
    history = [{"role": "user", "content": "n?"},
               {"role": "assistant", "content": "", "tool_calls": [{"name": "count", "arguments": {"n": 1}}]},
               {"role": "tool", "content": "1", "tool_call_id": "call_1"}]  # fmt: skip
    messages, extra = prompt_messages(tok, history, tools)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]  # no system message added
    text = tok.apply_chat_template(messages, **extra)
    assert text.startswith('TOOLS=[{"type": "function", "function": {"name": "lookup"')
    assert "[call count]" in text and "tool: 1" in text


@pytest.mark.slow
def test_real_model_json_schema_and_tool_call():
    """SmolLM2 (dense), greedy: the answer follows the schema, and a required tool call names the tool."""
    from mmt_mlx.loader import load_model

    lm = load_model("smollm2-135m-instruct", dense=True)
    tok = lm.tokenizer
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["city", "country"], "additionalProperties": False}  # fmt: skip
    ask = [{"role": "user", "content": "Name the capital of France as JSON."}]
    ids = tok.encode(tok.apply_chat_template(ask))
    text = "".join(c.text for c in stream_generate(lm, ids, max_tokens=60,
                                                   grammar=compile_grammar(tok, "json_schema", schema)))  # fmt: skip
    assert json.loads(text)["city"] == "Paris"
    tools = parse_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
        "additionalProperties": False}}}])  # fmt: skip
    messages, extra = prompt_messages(tok, [{"role": "user", "content": "Weather in Paris?"}], tools)
    ids = tok.encode(tok.apply_chat_template(messages, **extra))
    grammar = tool_grammar(tok, tools, "required", parallel=False)
    text = "".join(c.text for c in stream_generate(lm, ids, max_tokens=60, grammar=grammar))
    (call,) = parse_calls(text)
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] == "Paris"
