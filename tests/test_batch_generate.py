"""Continuous batching and the prompt cache in the runtime: batched forward == single forward (dense and FGS,
Llama and Gemma with its sliding window), a batch of streams == each stream alone, prompt-cache hits == cold."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mmt_mlx.batch_cache import PaddedBatch
from mmt_mlx.batch_generate import BatchGenerator
from mmt_mlx.cache import BatchCache
from mmt_mlx.generate import stream_generate
from mmt_mlx.prompt_cache import PromptCache
from mmt_mlx.request import make_request
from mmt_mlx.sample import SamplingParams
from mmt_mlx.testing import tiny_model

PROMPTS = [list(range(100, 100 + n)) for n in (3, 11, 20, 7)]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def lm(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def fgs_lm(tiny_gguf, tmp_path_factory):
    from mmt_mlx.build import load_fgs
    from mmt_mlx.convert import convert
    from mmt_mlx.locate import load_source

    out = tmp_path_factory.mktemp("fgs") / "tiny-llama-fgs"
    _, src = load_source(tiny_gguf["llama"][0])
    convert(src, out, tau=2e-3, progress=False)
    return load_fgs(out, "fgs")


def _batched_equals_single(lm) -> None:
    """Prefill each prompt alone, then one batched decode step == the same step run per request."""
    model = lm.model
    caches, singles = [], []
    for p in PROMPTS:
        c = model.make_cache()
        model(mx.array(p)[None], c)
        caches.append(c)
        c2 = model.make_cache()
        model(mx.array(p)[None], c2)
        singles.append(c2)
    nxt = [5, 6, 7, 8]
    for _ in range(3):  # a few steps: the caches keep growing at different lengths
        batch = [BatchCache([c[i] for c in caches]) for i in range(len(caches[0]))]
        out = model(mx.array([[t] for t in nxt]), batch)[:, -1]
        ref = mx.concatenate([model(mx.array([[t]]), c)[:, -1] for t, c in zip(nxt, singles)])
        np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)
        nxt = np.array(out).argmax(-1).tolist()


def test_batched_forward_equals_single(lm):
    _batched_equals_single(lm)


def test_padded_batch_equals_single(lm):
    """The batch's KV in one left-padded buffer: each step == each request alone (Gemma: sliding layers
    masked to their window), and the rows handed back continue exactly as the requests run alone."""
    model = lm.model
    caches, singles = [], []
    for p in PROMPTS:  # 3..20 tokens: rows padded differently; Gemma's tiny window (8) is exceeded
        for out in (caches, singles):
            c = model.make_cache()
            model(mx.array(p)[None], c)
            out.append(c)
    padded = PaddedBatch(tuple(range(len(PROMPTS))), caches)
    nxt = [5, 6, 7, 8]
    for _ in range(12):  # past the growth of the single caches and across the window
        out = model(mx.array([[t] for t in nxt]), padded.layers)[:, -1]
        padded.advance()
        ref = mx.concatenate([model(mx.array([[t]]), c)[:, -1] for t, c in zip(nxt, singles)])
        np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)
        nxt = np.array(out).argmax(-1).tolist()
    for i, (c, single) in enumerate(zip(caches, singles)):
        back = padded.row_caches(i, c)
        assert [b.offset for b in back] == [s.offset for s in single]
        got = model(mx.array([[nxt[i]]]), back)[:, -1]
        want = model(mx.array([[nxt[i]]]), single)[:, -1]
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_batched_forward_equals_single_fgs(fgs_lm):
    _batched_equals_single(fgs_lm)


def _requests(lm, seeded: bool):
    out = []
    for i, p in enumerate(PROMPTS):
        sp = SamplingParams(temperature=0.9, top_p=0.95, seed=10 + i) if seeded else SamplingParams()
        out.append(make_request(lm, p, max_tokens=12 + 3 * i, sampling=sp, logprobs=2 if i == 1 else 0))
    return out


def _run_all(gen: BatchGenerator, requests) -> dict[int, list]:
    uids = [gen.add(r) for r in requests]
    chunks: dict[int, list] = {u: [] for u in uids}
    while len(gen):
        for ev in gen.step():
            assert ev.error is None, ev.error
            chunks[ev.uid].append(ev.chunk)
    return {i: chunks[u] for i, u in enumerate(uids)}


def _alone(lm, r) -> list:
    return list(
        stream_generate(lm, r.prompt, max_tokens=r.max_tokens, sampling=r.sampling, logprobs=r.logprobs)
    )


@pytest.mark.parametrize("seeded", [False, True])
def test_batch_equals_each_request_alone(lm, seeded):
    reqs = _requests(lm, seeded)
    got = _run_all(BatchGenerator(lm, max_batch=4, busy_prefill_chunk=4), reqs)
    for i, r in enumerate(_requests(lm, seeded)):
        ref = _alone(lm, r)
        assert [c.token for c in got[i]] == [c.token for c in ref]
        assert "".join(c.text for c in got[i]) == "".join(c.text for c in ref)
        assert got[i][-1].finish_reason == ref[-1].finish_reason
        if r.logprobs:
            assert got[i][0].top_logprobs is not None and len(got[i][0].top_logprobs) == 2


def test_fgs_batch_equals_alone(fgs_lm):
    reqs = _requests(fgs_lm, False)[:3]
    got = _run_all(BatchGenerator(fgs_lm, max_batch=3), reqs)
    for i, r in enumerate(reqs):
        assert [c.token for c in got[i]] == [c.token for c in _alone(fgs_lm, r)]


@pytest.mark.parametrize("seeded", [False, True])
def test_pipelined_decode_equals_synchronous(lm, seeded):
    """Host-free requests run ahead (the next token queued before the host reads this one); a logits
    processor forces the synchronous step. Both give the same tokens, text and log-probs."""
    for r in _requests(lm, seeded):
        gen = BatchGenerator(lm, max_batch=1)
        uid = gen.add(r)
        piped = []
        while len(gen):
            piped += [ev.chunk for ev in gen.step()]
            if len(gen) and piped:
                assert gen._streams[uid].ahead is not None  # the next step is already queued
        sync_req = make_request(
            lm, r.prompt, max_tokens=r.max_tokens, sampling=r.sampling, logprobs=r.logprobs,
            logits_processors=(lambda tokens, logits: logits,),
        )  # fmt: skip
        gen = BatchGenerator(lm, max_batch=1)
        uid = gen.add(sync_req)
        sync = []
        while len(gen):
            sync += [ev.chunk for ev in gen.step()]
            assert uid not in gen._streams or gen._streams[uid].ahead is None
        assert [c.token for c in piped] == [c.token for c in sync]
        assert "".join(c.text for c in piped) == "".join(c.text for c in sync)
        assert [c.logprob for c in piped] == [c.logprob for c in sync]
        assert piped[-1].finish_reason == sync[-1].finish_reason


def test_failing_request_does_not_disturb_others(lm):
    def boom(tokens, logits):
        if len(tokens) > 14:
            raise ValueError("constraint failed")
        return logits

    reqs = _requests(lm, False)
    bad = make_request(lm, PROMPTS[2], max_tokens=20, logits_processors=(boom,))
    gen = BatchGenerator(lm, max_batch=5)
    uids = [gen.add(r) for r in reqs] + [gen.add(bad)]
    chunks: dict[int, list] = {u: [] for u in uids}
    errors = {}
    while len(gen):
        for ev in gen.step():
            if ev.error is not None:
                errors[ev.uid] = ev.error
            else:
                chunks[ev.uid].append(ev.chunk)
    assert list(errors) == [uids[-1]] and isinstance(errors[uids[-1]], ValueError)
    for u, r in zip(uids, reqs):
        assert [c.token for c in chunks[u]] == [c.token for c in _alone(lm, r)]


def test_remove_frees_the_slot_at_once(lm):
    gen = BatchGenerator(lm, max_batch=2)
    a = gen.add(_requests(lm, False)[2])
    gen.add(_requests(lm, False)[3])
    assert not gen.has_room
    gen.step()
    gen.remove(a)
    assert gen.has_room and len(gen) == 1


def test_logits_processor_masks_tokens(lm):
    allowed = mx.full((lm.model.args.vocab_size,), -mx.inf).at[mx.array([7, 9])].add(mx.inf)

    def only_7_or_9(tokens, logits):
        return mx.where(mx.isinf(allowed), -mx.inf, logits)

    r = make_request(lm, PROMPTS[1], max_tokens=6, logits_processors=(only_7_or_9,))
    toks = [c.token for c in _run_all(BatchGenerator(lm), [r])[0]]
    assert toks and set(toks) <= {7, 9}


def test_prompt_cache_hit_equals_cold_run(lm):
    cache = PromptCache()
    gen = BatchGenerator(lm, max_batch=2, prompt_cache=cache)
    first = make_request(lm, list(range(200, 230)), max_tokens=10)
    out1 = _run_all(gen, [first])[0]
    assert len(cache) == 1
    # turn 2: the whole first exchange resent, plus new tokens
    turn2 = first.prompt + [c.token for c in out1] + list(range(300, 312))
    r2 = make_request(lm, turn2, max_tokens=10)
    warm = _run_all(gen, [r2])[0]
    assert warm[0].cached_tokens >= len(first.prompt) + len(out1) - 1
    assert [c.token for c in warm] == [c.token for c in _alone(lm, r2)]
    assert cache.tokens_reused == warm[0].cached_tokens


def test_prompt_cache_sliding_window_reuses_only_exact_state():
    lm = tiny_model("gemma3")  # sliding window 8: a prefix far behind the cache's end is gone
    cache = PromptCache()
    gen = BatchGenerator(lm, max_batch=1, prompt_cache=cache)
    long = list(range(200, 400))  # 200 tokens: more than window + slack
    _run_all(gen, [make_request(lm, long, max_tokens=2)])
    r = make_request(lm, long[:40] + [5, 6, 7], max_tokens=6)  # shares 40 tokens, no longer held exactly
    out = _run_all(gen, [r])[0]
    assert out[0].cached_tokens == 0
    assert [c.token for c in out] == [c.token for c in _alone(lm, r)]
    r3 = make_request(lm, long + [9, 9], max_tokens=6)  # shares all 200: reusable
    out3 = _run_all(gen, [r3])[0]
    assert out3[0].cached_tokens >= 190
    assert [c.token for c in out3] == [c.token for c in _alone(lm, r3)]


def test_prompt_cache_budget_is_bounded(lm):
    cache = PromptCache(budget_bytes=80_000)  # room for two or three of these entries
    gen = BatchGenerator(lm, prompt_cache=cache)
    for k in range(6):
        _run_all(gen, [make_request(lm, list(range(1000 * k, 1000 * k + 60)), max_tokens=3)])
        assert cache.bytes <= cache.budget_bytes
    assert 0 < len(cache) < 6


def test_chunked_prefill_keeps_running_streams_flowing(lm):
    gen = BatchGenerator(lm, max_batch=2, busy_prefill_chunk=16)
    a = gen.add(make_request(lm, PROMPTS[0], max_tokens=40))
    gen.step()
    gen.step()  # a is decoding
    b = gen.add(make_request(lm, list(range(500, 650)), max_tokens=3))  # 150 tokens: ~10 chunks of 16
    steps = 0
    while True:
        events = {ev.uid: ev for ev in gen.step()}
        steps += 1
        assert a in events and events[a].chunk is not None, "the running stream stalled during a prefill"
        if b in events:
            break
    assert steps >= 9  # b's prompt was spread over many steps, one chunk each


def test_prompt_cache_drops_the_least_recently_used(lm):
    one = PromptCache()
    gen = BatchGenerator(lm, prompt_cache=one)
    prompts = [list(range(1000 * k, 1000 * k + 40)) for k in (1, 2, 3)]
    for p in prompts:
        _run_all(gen, [make_request(lm, p, max_tokens=2)])
    size = one.bytes // 3
    cache = PromptCache(budget_bytes=int(size * 2.5))
    gen = BatchGenerator(lm, prompt_cache=cache)
    for p in prompts[:2]:
        _run_all(gen, [make_request(lm, p, max_tokens=2)])
    assert cache.lookup(prompts[0] + [7])[0] > 0  # a hit makes the first one the most recently used
    _run_all(gen, [make_request(lm, prompts[2], max_tokens=2)])
    assert len(cache) == 2
    assert cache.lookup(prompts[0] + [7])[0] > 0 and cache.lookup(prompts[1] + [7])[0] == 0


def test_grammar_constrained_request_in_a_batch(lm):
    """Structured output's per-request grammar state rides in the batch: the constrained answer equals the
    same request alone and parses; the unconstrained neighbours are untouched."""
    import json

    from mmt_mlx.constrain import compile_grammar

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    grammar = compile_grammar(lm.tokenizer, "json_schema", schema)
    constrained = make_request(lm, PROMPTS[2], max_tokens=40, grammar=grammar)
    reqs = _requests(lm, False)[:2] + [constrained]
    got = _run_all(BatchGenerator(lm, max_batch=3), reqs)
    alone = list(stream_generate(lm, constrained.prompt, max_tokens=40, grammar=grammar))
    assert [c.token for c in got[2]] == [c.token for c in alone]
    if got[2][-1].finish_reason == "stop":
        assert isinstance(json.loads("".join(c.text for c in got[2]))["n"], int)
    for i, r in enumerate(reqs[:2]):
        assert [c.token for c in got[i]] == [c.token for c in _alone(lm, r)]
