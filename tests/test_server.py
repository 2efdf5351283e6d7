"""The OpenAI-compatible server, end to end: a real uvicorn on 127.0.0.1 driven by the `openai` client and
raw httpx. The model is `tiny_model()` (random weights, real tokenizer): outputs are gibberish, but
deterministic, so the server's answers are compared with direct `stream_generate` calls."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from mmt_mlx.server.app import create_app
from server_helpers import LiveServer, serve_module

from mmt_mlx.generate import stream_generate
from mmt_mlx.sample import SamplingParams
from mmt_mlx.testing import tiny_model

KEY = "test-secret-key"


@pytest.fixture(scope="module")
def lm():
    return tiny_model()  # used directly (test thread) for reference outputs; each server loads its own


@pytest.fixture(scope="module")
def live():
    yield from serve_module(tiny_model)


@pytest.fixture(scope="module")
def client(live):
    return live.client()


@pytest.fixture(scope="module")
def model_name(live):
    return httpx.get(live.url + "/health").json()["model"]


def direct(lm, prompt: list[int], max_tokens: int, **sampling: Any) -> str:
    chunks = stream_generate(lm, prompt, max_tokens=max_tokens, sampling=SamplingParams(**sampling))
    return "".join(c.text for c in chunks)


def chat_ids(lm, content: str) -> list[int]:
    return lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": content}]))


MSGS = [{"role": "user", "content": "Say hello."}]


# -- basics ---------------------------------------------------------------------------------------------


def test_health_models_and_aliases(live, client, model_name, lm):
    assert httpx.get(live.url + "/health").json() == {"status": "ok", "model": model_name}
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name
    for alias in [model_name.upper()] + ([lm.path] if lm.path else []):
        r = client.chat.completions.create(model=alias, messages=MSGS, max_tokens=2)
        assert r.model == model_name


def test_chat_completion_matches_direct_generation(client, model_name, lm):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=12)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 0
    assert r.model == model_name and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    ids = chat_ids(lm, "Say hello.")
    assert choice.message.content == direct(lm, ids, 12)  # greedy by default
    assert r.usage.prompt_tokens == len(ids)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_max_completion_tokens_and_length(client, model_name, lm):
    banned = sorted(lm.tokenizer.eos_ids)  # no end of text: the budget alone stops the answer
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=5, max_completion_tokens=3,
                                       logit_bias={str(t): -100 for t in banned})  # fmt: skip
    ids = chat_ids(lm, "Say hello.")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3  # max_completion_tokens wins over max_tokens
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == direct(lm, ids, 3, logit_bias={t: -100.0 for t in banned})


def test_completion_prompt_forms(client, model_name, lm):
    ids = lm.tokenizer.encode("The quick brown fox")
    expected = direct(lm, ids, 10)
    for prompt in ("The quick brown fox", ["The quick brown fox"], ids, [ids]):
        r = client.completions.create(model=model_name, prompt=prompt, max_tokens=10)
        assert r.id.startswith("cmpl-") and r.object == "text_completion"
        assert r.choices[0].text == expected
        assert r.usage.prompt_tokens == len(ids)
    default = client.completions.create(model=model_name, prompt="The quick brown fox")
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions
    echo = client.completions.create(model=model_name, prompt="The quick brown fox", max_tokens=10, echo=True)
    assert echo.choices[0].text == "The quick brown fox" + expected


def test_streaming_chat_with_usage(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=15)
    stream = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=15, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])


def test_streaming_completion_raw_sse(live, model_name):
    body = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in e for e in events)  # only with stream_options.include_usage
    text = "".join(e["choices"][0]["text"] for e in events)
    full = httpx.post(live.url + "/v1/completions", json=dict(body, stream=False), timeout=60).json()
    assert text == full["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_stop_strings(client, model_name):
    base = client.completions.create(
        model=model_name, prompt="Hello world", max_tokens=30, logit_bias={"0": -100}
    )
    text = base.choices[0].text
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for stream in (False, True):
        kw: dict[str, Any] = {"model": model_name, "prompt": "Hello world", "max_tokens": 30,
                              "logit_bias": {"0": -100}, "stop": [stop, "zzz"]}  # fmt: skip
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            got = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = client.completions.create(**kw)
            got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert got == text[: text.index(stop)] and finish == "stop"
        assert stop not in got


def test_seed_reproducibility(client, model_name):
    def run(seed: int) -> str:
        r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=16, temperature=1.0,
                                           seed=seed)  # fmt: skip
        return r.choices[0].message.content

    assert run(42) == run(42)
    assert run(-7) == run(-7)  # OpenAI seeds are int64
    assert len({run(s) for s in (1, 2, 3, 4)}) > 1


def test_chat_logprobs(client, model_name, lm):
    r = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=6, logprobs=True,
                                       top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6 and len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        tops = entry.top_logprobs
        assert len(tops) == 3 and [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert tops[0].token == entry.token and tops[0].logprob == pytest.approx(entry.logprob)  # greedy
    r0 = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=3, logprobs=True)
    assert all(e.top_logprobs == [] for e in r0.choices[0].logprobs.content)
    assert (
        client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=3).choices[0].logprobs
        is None
    )
    chunks = list(client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=6, logprobs=True,
                                                 top_logprobs=2, stream=True))  # fmt: skip
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_completion_logprobs(client, model_name):
    r = client.completions.create(model=model_name, prompt="Hi there", max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == r.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0


def test_logit_bias_forces_a_token(client, model_name, lm):
    tid = lm.tokenizer.encode(" banana", add_bos=False)[0]
    r = client.completions.create(model=model_name, prompt="Hi", max_tokens=4, logit_bias={str(tid): 100})
    assert r.choices[0].text == lm.tokenizer.decode([tid] * 4)


def test_metrics(live, client, model_name):
    client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=2)
    text = live.metrics()
    assert 'mmt_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    for name in ("mmt_prompt_tokens_total", "mmt_generation_tokens_total", "mmt_queue_depth 0",
                 'mmt_generation_tokens_per_second{stat="last"}', 'mmt_prompt_tokens_per_second{stat="avg"}'):  # fmt: skip
        assert name in text
    tokens = [line for line in text.splitlines() if line.startswith("mmt_generation_tokens_total ")]
    assert float(tokens[0].split()[1]) > 0


# -- errors ---------------------------------------------------------------------------------------------


def _error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_errors_through_openai_client(client, model_name, lm):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MSGS)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model=model_name, messages=MSGS, n=2)
    with pytest.raises(openai.BadRequestError, match="json schema"):  # structured output: tests of its own
        client.chat.completions.create(
            model=model_name, messages=MSGS,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=MSGS, temperature=5)
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.completions.create(model=model_name, prompt="x", stop=["a", "b", "c", "d", "e"])
    long_prompt = "hello " * (lm.context_length + 10)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt=long_prompt)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": long_prompt}],
                                       stream=True)  # fmt: skip
    assert e.value.code == "context_length_exceeded"
    text = client.chat.completions.create(model=model_name, messages=MSGS, max_tokens=2,
                                          response_format={"type": "text"}, user="u1")  # fmt: skip
    assert text.choices[0].message.content is not None


def test_malformed_and_invalid_bodies(live, model_name):
    url = live.url + "/v1/chat/completions"

    def post(body: bytes) -> httpx.Response:
        return httpx.post(url, content=body, headers={"content-type": "application/json"})

    _error(post(b'{"messages": [ '), 400)
    _error(post(b""), 400)
    _error(post(b"[1, 2]"), 400)
    _error(post(b"\xff\xfe"), 400)
    ok = {"model": model_name, "messages": MSGS, "max_tokens": 2}
    cases = [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, None),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"seed": "x"}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            None,
        ),
    ]
    for patch, param in cases:
        _error(httpx.post(url, json={**ok, **patch}), 400, param)
    missing = dict(ok)
    del missing["messages"]
    _error(httpx.post(url, json=missing), 400, "messages")
    _error(httpx.post(live.url + "/v1/completions", json={"model": model_name}), 400, "prompt")
    _error(httpx.post(live.url + "/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")
    _error(httpx.post(live.url + "/v1/completions", json={"prompt": [10**9]}), 400, "prompt")
    _error(httpx.post(live.url + "/v1/completions", json={"prompt": "x", "logprobs": 30}), 400, "logprobs")
    # unknown fields are ignored; content parts of type text are joined
    extra = {
        **ok,
        "frobnicate": {"a": 1},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    assert httpx.post(url, json=extra, timeout=60).status_code == 200


def test_huge_body_routes_and_methods(live):
    big = b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    r = httpx.post(live.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    _error(r, 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    _error(httpx.post(live.url + "/v1/completions", content=chunked()), 413)
    _error(httpx.get(live.url + "/v1/nothing"), 404)
    _error(httpx.get(live.url + "/v1/chat/completions"), 405)
    _error(httpx.get(live.url + "/v1/models/unknown-model"), 404, code="model_not_found")


def test_api_key():
    s = LiveServer(create_app(tiny_model, api_key=KEY))
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # health stays open
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        _error(httpx.get(s.url + "/v1/models"), 401, code="invalid_api_key")
        _error(httpx.post(s.url + "/v1/completions", json={"prompt": "x"}), 401)
        good = s.client(api_key=KEY)
        name = good.models.list().data[0].id
        assert good.completions.create(model=name, prompt="Hi", max_tokens=2).choices[0].text is not None
        assert 'status="401"' in s.metrics()
    finally:
        s.close()


def test_health_503_while_loading():
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return tiny_model()

    s = LiveServer(create_app(slow_loader), wait_ready=False)
    try:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        _error(httpx.get(s.url + "/v1/models"), 503, code="model_loading")
        _error(httpx.post(s.url + "/v1/completions", json={"prompt": "x"}), 503)
        release.set()
        s.wait_ready(60)
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
    finally:
        release.set()
        s.close()


def test_load_failure_reported():
    from mmt_mlx.errors import ModelNotFoundError

    def bad_loader():
        raise ModelNotFoundError("no such model: nope")

    s = LiveServer(create_app(bad_loader), wait_ready=False)
    try:
        s.app.state.engine.loaded.wait(10)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "nope" in r.json()["error"]
        _error(httpx.get(s.url + "/v1/models"), 503, code="model_load_failed")
    finally:
        s.close()


def test_concurrent_requests_get_their_own_outputs(live, model_name, lm):
    prompts = ["One", "Two apples", "Three blind mice", "Four"]
    expected = {
        p: direct(lm, lm.tokenizer.encode(p), 8, temperature=0.9, seed=i) for i, p in enumerate(prompts)
    }
    results: dict[str, str] = {}

    def run(i: int, p: str) -> None:
        body = {
            "model": model_name,
            "prompt": p,
            "max_tokens": 8,
            "temperature": 0.9,
            "seed": i,
            "stream": True,
        }
        text = ""
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        results[p] = text

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected


# -- the real default model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_default_model_chat():
    from mmt_mlx.loader import load_model

    s = LiveServer(create_app(load_model), wait_ready=False)
    try:
        s.wait_ready(1800)  # the first use converts the built-in model to FGS codes (minutes on a small CPU)
        client = s.client()
        name = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30,
        )
        text = r.choices[0].message.content
        assert text and text.strip() and "paris" in text.lower(), text
    finally:
        s.close()
