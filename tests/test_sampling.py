"""Sampling rules and stop-string matching."""

import mlx.core as mx
import numpy as np
import pytest

from mmt_mlx.errors import MmtError
from mmt_mlx.generate import StopMatcher
from mmt_mlx.sample import Sampler, SamplingParams


def draws(params: SamplingParams, logits, n: int = 200) -> list[int]:
    s = Sampler(params)
    x = mx.array(logits, dtype=mx.float32)
    return [int(s.sample(x).item()) for _ in range(n)]


def test_greedy_is_argmax():
    assert set(draws(SamplingParams(temperature=0), [0.1, 3.0, 2.9, -1.0], 5)) == {1}


def test_top_k_keeps_only_k_best():
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=1), [1.0, 2.0, 3.0, 0.5])) == {1, 2}


def test_top_p_keeps_smallest_set_reaching_p():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=2), logits)) == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = np.log([0.6, 0.3, 0.05, 0.05])
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.2, seed=3), logits)) == {0, 1}


def test_same_seed_same_tokens():
    logits = np.zeros(50)
    p = SamplingParams(temperature=1.0, seed=42)
    assert draws(p, logits, 30) == draws(p, logits, 30)
    assert draws(p, logits, 30) != draws(SamplingParams(temperature=1.0, seed=43), logits, 30)


def test_repetition_penalty_and_bias():
    s = Sampler(SamplingParams(repetition_penalty=2.0, logit_bias={3: -100.0}))
    out = np.array(s.process(mx.array([2.0, -1.0, 1.0, 5.0]), context=[0, 1], generated=[]))
    np.testing.assert_allclose(out, [1.0, -2.0, 1.0, -95.0])


def test_presence_and_frequency_penalties():
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    out = np.array(s.process(mx.array([1.0, 1.0, 1.0]), context=[], generated=[2, 2, 0]))
    np.testing.assert_allclose(out, [0.25, 1.0, 0.0])


def test_bad_params_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=2)):
        with pytest.raises(MmtError):
            Sampler(SamplingParams(**bad))


def test_stop_string_across_chunks():
    m = StopMatcher(["<END>"])
    outs = [m.feed(t) for t in ["Hello <", "EN", "D> tail"]]
    assert "".join(o for o, _ in outs) == "Hello "
    assert outs[-1][1] is True


def test_stop_matcher_releases_false_prefix():
    m = StopMatcher(["ab"])
    assert m.feed("xa") == ("x", False)
    assert m.feed("c") == ("ac", False)
