"""Continuous batching and the prompt cache through the server: a real uvicorn on loopback, the `openai`
client, the tiny random-weight models. Every answer is compared token for token (as text) with the same
request run alone through ``stream_generate``."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from mmt_mlx.server.app import create_app
from mmt_mlx.server.engine import Engine, GenerationStats, Job
from server_helpers import LiveServer, gauge

from mmt_mlx.generate import stream_generate
from mmt_mlx.request import make_request
from mmt_mlx.sample import SamplingParams
from mmt_mlx.testing import tiny_model

NO_EOS = {"0": -100, "2": -100}  # the tiny model's gibberish would often end early otherwise


@pytest.fixture(scope="module")
def lm():
    return tiny_model()


@pytest.fixture(scope="module")
def batched():
    s = LiveServer(create_app(tiny_model, max_batch=4, max_queue=8))
    yield s
    s.close()


def direct(lm, prompt: str, max_tokens: int, **sampling: Any) -> str:
    bias = {int(k): float(v) for k, v in NO_EOS.items()}
    sp = SamplingParams(logit_bias=bias, **sampling)
    ids = lm.tokenizer.encode(prompt)
    return "".join(c.text for c in stream_generate(lm, ids, max_tokens=max_tokens, sampling=sp))


def stream_text(s: LiveServer, prompt: str, max_tokens: int, stop_after: int | None = None, **kw: Any) -> str:
    """Stream a completion with the openai client; ``stop_after`` chunks: close the stream (a disconnect)."""
    client = s.client()
    text, n = "", 0
    stream = client.completions.create(model=s.model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                       logit_bias=NO_EOS, **kw)  # fmt: skip
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        n += 1
        if stop_after is not None and n >= stop_after:
            stream.close()
            break
    return text


class PeakGauge:
    """Polls a /metrics gauge in the background and keeps its highest value."""

    def __init__(self, s: LiveServer, name: str) -> None:
        self.s, self.name, self.peak = s, name, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, gauge(self.s, self.name))
            time.sleep(0.005)

    def stop(self) -> float:
        self._stop.set()
        self._t.join(5)
        return self.peak


@pytest.mark.parametrize("seeded", [False, True])
def test_concurrent_streams_equal_each_alone(batched, lm, seeded):
    prompts = ["Once upon a time", "The quick brown fox", "In a hole in the ground", "Tell me", "Hi", "A B C"]
    lengths = [60, 45, 70, 30, 55, 40]
    kw = [dict(temperature=0.8, top_p=0.9, seed=7 + i) if seeded else {} for i in range(len(prompts))]
    expected = [direct(lm, p, n, **k) for p, n, k in zip(prompts, lengths, kw)]
    results: list[str | None] = [None] * len(prompts)

    def run(i: int) -> None:
        results[i] = stream_text(batched, prompts[i], lengths[i], **kw[i])

    peak = PeakGauge(batched, "mmt_requests_running")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert peak.stop() > 1, "the requests were never generated together"
    assert results == expected
    assert gauge(batched, "mmt_requests_running") == 0 and gauge(batched, "mmt_queue_depth") == 0


def test_disconnect_frees_its_slot_at_once():
    s = LiveServer(create_app(tiny_model, max_batch=2, max_queue=4))
    try:
        hold = threading.Thread(target=stream_text, args=(s, "Keep going", 3000), daemon=True)
        hold.start()  # one long stream holds one slot for the whole test
        deadline = time.time() + 30
        while gauge(s, "mmt_requests_running") < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        stream_text(s, "Tell me a long story", 3000, stop_after=3)  # takes the other slot, then leaves
        t0 = time.perf_counter()
        out = s.client().completions.create(model=s.model, prompt="Hi", max_tokens=3)
        assert out.choices[0].text is not None
        assert time.perf_counter() - t0 < 5.0, "the disconnected stream kept its slot"
        assert gauge(s, "mmt_generations_cancelled_total") >= 1
        assert gauge(s, "mmt_requests_running") == 1  # the long one, still going
    finally:
        s.close()


def test_cancel_under_load_loses_nothing(batched, lm):
    prompts = [f"Story number {i}" for i in range(8)]
    expected = {i: direct(lm, p, 50) for i, p in enumerate(prompts) if i % 2 == 0}
    results: dict[int, str] = {}

    def run(i: int) -> None:  # odd ones disconnect after a few chunks
        results[i] = stream_text(batched, prompts[i], 50, stop_after=4 if i % 2 else None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {i: results[i] for i in expected} == expected
    assert all(results[i] for i in range(1, 8, 2))
    deadline = time.time() + 10
    while gauge(batched, "mmt_requests_running") or gauge(batched, "mmt_queue_depth"):
        assert time.time() < deadline, "cancelled requests still hold the batch or the queue"
        time.sleep(0.02)


def test_erroring_request_does_not_disturb_the_batch():
    """A request whose generation raises (here its logits processor) fails alone; the others finish intact."""
    stats: list[GenerationStats] = []
    engine = Engine(tiny_model, max_queue=4, max_batch=4, on_generation=stats.append)
    engine.start()
    assert engine.loaded.wait(120) and engine.ready and engine.lm is not None
    lm = engine.lm

    def breaks(tokens: list[int], logits: Any) -> Any:
        if len(tokens) > 12:
            raise RuntimeError("constraint engine crashed")
        return logits

    prompts = [lm.tokenizer.encode(p) for p in ("Alpha beta", "Gamma", "Delta epsilon zeta")]
    good = [make_request(lm, p, max_tokens=25) for p in prompts]
    bad = make_request(lm, prompts[0], max_tokens=25, logits_processors=(breaks,))

    async def scenario() -> tuple[list[list[str]], BaseException | None]:
        jobs = [Job(request=r) for r in good]
        bad_job = Job(request=bad)
        for j in [jobs[0], bad_job, *jobs[1:]]:
            engine.submit(j)

        async def drain(job: Job) -> list[str]:
            return [c.text async for c in job.chunks()]

        err: BaseException | None = None
        try:
            await asyncio.wait_for(drain(bad_job), 30)
        except RuntimeError as exc:
            err = exc
        outs = await asyncio.wait_for(asyncio.gather(*(drain(j) for j in jobs)), 60)
        return list(outs), err

    try:
        outs, err = asyncio.run(scenario())
    finally:
        engine.stop()
    assert err is not None and "constraint engine crashed" in str(err)
    for out, r in zip(outs, good):
        ref = "".join(c.text for c in stream_generate(lm, r.prompt, max_tokens=r.max_tokens))
        assert "".join(out) == ref


def test_prompt_cache_turn_two_equals_cold_run(lm):
    s = LiveServer(create_app(tiny_model, max_batch=2))
    try:
        client = s.client()
        msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
        r1 = client.chat.completions.create(model=s.model, messages=msgs, max_tokens=30, logit_bias=NO_EOS)
        msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "Now one about mountains."}]  # fmt: skip
        assert gauge(s, "mmt_prompt_tokens_cached_total") == 0
        r2 = client.chat.completions.create(model=s.model, messages=msgs, max_tokens=30, logit_bias=NO_EOS)
        reused = gauge(s, "mmt_prompt_tokens_cached_total")
        assert reused >= 20, "turn 2 did not start from turn 1's cached state"
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        assert r2.usage.prompt_tokens_details.cached_tokens == reused
        ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(msgs))
        assert reused < len(ids)
        bias = {int(k): float(v) for k, v in NO_EOS.items()}
        cold = stream_generate(lm, ids, max_tokens=30, sampling=SamplingParams(logit_bias=bias))
        assert r2.choices[0].message.content == "".join(c.text for c in cold)
        assert gauge(s, "mmt_prompt_cache_bytes") > 0
        assert "mmt_time_to_first_token_seconds_count 2" in s.metrics()
    finally:
        s.close()


def test_serve_flags_are_checked(capsys):
    from mmt_mlx.cli import main

    assert main(["serve", "--max-batch", "0"]) == 1
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--prompt-cache-mb", "-1"]) == 1
    assert "--prompt-cache-mb must be >= 0" in capsys.readouterr().err
