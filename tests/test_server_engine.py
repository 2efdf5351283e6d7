"""The generation engine behind the server: queueing, cancellation, stopping, and generators that fail.

Served by a real uvicorn on loopback (``server_helpers.LiveServer``) with the tiny random-weight model; the
engine is also driven directly for what HTTP cannot reach (``Engine.stop`` with jobs queued)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import httpx
import openai
import pytest
from mmt_mlx.server.app import create_app
from mmt_mlx.server.engine import Engine, GenerationStats, Job, NotReadyError
from server_helpers import LiveServer, gauge, slowed

from mmt_mlx.errors import MmtError
from mmt_mlx.generate import GenerationChunk, generate_request, stream_generate
from mmt_mlx.request import GenerationRequest, make_request
from mmt_mlx.sample import SamplingParams
from mmt_mlx.testing import tiny_model


@pytest.fixture(scope="module")
def slow():
    s = LiveServer(create_app(tiny_model, max_queue=1, generate_fn=slowed(0.02)))
    yield s
    s.close()


def test_disconnect_mid_stream_frees_the_worker(slow):
    body = {"prompt": "Tell me a long story", "max_tokens": 400, "stream": True, "logit_bias": {"0": -100}}
    with httpx.stream("POST", slow.url + "/v1/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
                if got == 3:
                    break  # leaving the block closes the connection mid-stream
    t0 = time.perf_counter()
    r = slow.client().completions.create(model=slow.model, prompt="Hi", max_tokens=3)
    elapsed = time.perf_counter() - t0
    assert r.choices[0].text is not None
    assert elapsed < 3.0, f"the next request waited {elapsed:.1f}s: the disconnected one kept generating"
    assert gauge(slow, "mmt_generations_cancelled_total") >= 1


def test_non_streaming_disconnect_cancels(slow):
    body = {"prompt": "Tell me a long story", "max_tokens": 400, "logit_bias": {"0": -100}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/completions", json=body, timeout=0.5)
    t0 = time.perf_counter()
    slow.client().completions.create(model=slow.model, prompt="Hi", max_tokens=3)
    assert time.perf_counter() - t0 < 3.0


def test_disconnect_while_queued_frees_the_slot(slow):
    long = {"prompt": "Tell me a long story", "max_tokens": 300, "stream": True, "logit_bias": {"0": -100}}
    with httpx.stream("POST", slow.url + "/v1/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)  # the long request is being generated
        with pytest.raises(httpx.ReadTimeout):  # this one waits in the queue, then its client gives up
            httpx.post(slow.url + "/v1/completions", json=dict(long, stream=False), timeout=0.5)
        deadline = time.time() + 3
        while gauge(slow, "mmt_queue_depth"):
            assert time.time() < deadline, "the abandoned request still holds its queue slot"
            time.sleep(0.02)
        assert gauge(slow, "mmt_requests_running") == 1


def test_queue_full_429(slow):
    body = {"prompt": "Tell me a long story", "max_tokens": 300, "stream": True, "logit_bias": {"0": -100}}
    streams: list[Any] = []
    stop = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", slow.url + "/v1/completions", json=body, timeout=60) as r:
            streams.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    try:
        threads[0].start()
        deadline = time.time() + 10
        while gauge(slow, "mmt_requests_running") < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        threads[1].start()
        while gauge(slow, "mmt_queue_depth") < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as e:
            slow.client().completions.create(model=slow.model, prompt="Hi", max_tokens=3)
        assert e.value.code == "queue_full"
        assert 'status="429"' in slow.metrics()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert streams == [200, 200]
    deadline = time.time() + 10
    while gauge(slow, "mmt_queue_depth") or gauge(slow, "mmt_requests_running"):
        assert time.time() < deadline, "cancelled requests did not free the queue"
        time.sleep(0.02)


# -- Engine.stop -------------------------------------------------------------------------------------------


def test_engine_stop_with_jobs_queued():
    """Stopping ends the running job before its next token, ends every queued job with no output, reports
    the cancelled generation to the hook, refuses new jobs and joins the worker thread."""
    stats: list[GenerationStats] = []
    engine = Engine(tiny_model, max_queue=4, generate_fn=slowed(0.05), on_generation=stats.append)
    engine.start()
    assert engine.loaded.wait(120) and engine.ready
    assert engine.lm is not None
    ban = SamplingParams(logit_bias={t: -100.0 for t in engine.lm.tokenizer.eos_ids})
    long = make_request(
        engine.lm, engine.lm.tokenizer.encode("Tell me a long story"), max_tokens=200, sampling=ban
    )

    async def drain(job: Job) -> list[GenerationChunk]:
        return [c async for c in job.chunks()]

    async def scenario() -> tuple[list[GenerationChunk], list[list[GenerationChunk]]]:
        running, queued = Job(request=long), [Job(request=long) for _ in range(3)]
        engine.submit(running)
        for job in queued:
            engine.submit(job)
        first = await asyncio.wait_for(running.out.get(), 30)  # the worker is generating `running`
        assert engine.gauges().queue_depth == 3 and engine.gauges().running == 1
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        assert time.perf_counter() - t0 < 5.0
        rest = await asyncio.wait_for(drain(running), 10)
        waited = await asyncio.wait_for(asyncio.gather(*(drain(j) for j in queued)), 10)
        with pytest.raises(NotReadyError):
            engine.submit(Job(request=long))
        return [first, *rest], list(waited)

    ran, waited = asyncio.run(scenario())
    assert waited == [[], [], []]  # queued jobs end at once, without a token
    assert 1 <= len(ran) < 200 and all(c.finish_reason != "length" for c in ran)  # stopped, not run out
    assert engine.gauges().queue_depth == 0
    assert engine._thread is not None and not engine._thread.is_alive()
    assert len(stats) == 1 and stats[0].cancelled and stats[0].generation_tokens == len(ran)


# -- generators that fail ----------------------------------------------------------------------------------


def failing(after: int, exc: Exception) -> Callable[..., Iterator[GenerationChunk]]:
    """generate_request that raises ``exc`` after ``after`` chunks."""

    def gen(
        lm: Any, request: GenerationRequest, should_stop: Callable[[], bool]
    ) -> Iterator[GenerationChunk]:
        for i, chunk in enumerate(generate_request(lm, request, should_stop)):
            if i == after:
                raise exc
            yield chunk
        raise exc

    return gen


@pytest.fixture(scope="module")
def broken():
    s = LiveServer(create_app(tiny_model, generate_fn=failing(0, RuntimeError("kernel exploded"))))
    yield s
    s.close()


@pytest.fixture(scope="module")
def breaks_mid_stream():
    s = LiveServer(create_app(tiny_model, generate_fn=failing(3, RuntimeError("kernel exploded"))))
    yield s
    s.close()


def test_failing_generator_is_a_500(broken):
    for endpoint, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 5}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                           ("/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stream": True})):  # fmt: skip
        r = httpx.post(broken.url + endpoint, json=body, timeout=30)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "RuntimeError: kernel exploded" in err["message"]
    with pytest.raises(openai.InternalServerError, match="kernel exploded"):
        broken.client().completions.create(model=broken.model, prompt="Hi", max_tokens=3)
    assert 'status="500"' in broken.metrics()
    assert gauge(broken, "mmt_requests_running") == 0  # the failed job left the worker free
    assert httpx.get(broken.url + "/health").status_code == 200


def test_failing_generator_mid_stream_sends_an_sse_error(breaks_mid_stream):
    s = breaks_mid_stream
    body = {
        "prompt": "Tell me a story",
        "max_tokens": 50,
        "stream": True,
        "logit_bias": {"0": -100, "2": -100},
    }
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200  # the stream had started: the error comes as an event
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert [e["object"] for e in events[:-1]] == ["text_completion"] * (len(events) - 1)
    lm = tiny_model()
    sampling = SamplingParams(logit_bias={0: -100.0, 2: -100.0})
    before = list(islice(stream_generate(lm, lm.tokenizer.encode("Tell me a story"), max_tokens=50,
                                         sampling=sampling), 3))  # fmt: skip
    assert [e["choices"][0]["text"] for e in events[:-1]] == [c.text for c in before if c.text]
    err = events[-1]["error"]
    assert err["type"] == "server_error" and "RuntimeError: kernel exploded" in err["message"]
    non_stream = httpx.post(s.url + "/v1/completions", json=dict(body, stream=False), timeout=30)
    assert non_stream.status_code == 500 and "kernel exploded" in non_stream.json()["error"]["message"]


def test_user_error_from_the_generator_is_a_400():
    app = create_app(tiny_model, generate_fn=failing(0, MmtError("no chat template for this model")))
    s = LiveServer(app)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"] == "no chat template for this model"
    finally:
        s.close()
