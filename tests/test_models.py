"""Architectures on tiny random weights: shapes, cache equivalence, sliding windows."""

import mlx.core as mx
import numpy as np
import pytest

from mmt_mlx.build import build_model
from mmt_mlx.cache import KVCache, SlidingKVCache
from mmt_mlx.testing import TINY_CONFIGS, random_weights


def tiny(arch: str, **overrides):
    config = dict(TINY_CONFIGS[arch], vocab_size=97, **overrides)
    model = build_model(arch, config)
    model.load_weights([(k, mx.array(v)) for k, v in random_weights(model, arch, 1).items()])
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_logits_shape(arch):
    model = tiny(arch)
    out = model(mx.array([[1, 2, 3, 4, 5]]))
    assert out.shape == (1, 5, 97)
    assert bool(mx.all(mx.isfinite(out)))


@pytest.mark.parametrize("step", [256, 3])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_token_by_token_equals_full_forward(arch, step, monkeypatch):
    # 21 tokens: longer than the tiny Gemma's sliding window of 8, so the window and its cache are exercised;
    # with buffers grown 3 positions at a time the sliding caches also move their keys to a new buffer often.
    monkeypatch.setattr(SlidingKVCache, "step", step)
    monkeypatch.setattr(KVCache, "step", step)
    model = tiny(arch)
    tokens = mx.array([[(7 * i + 3) % 97 for i in range(21)]])
    full = model(tokens)
    cache = model.make_cache()
    steps = [model(tokens[:, i : i + 1], cache) for i in range(tokens.shape[1])]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_chunked_prefill_equals_full_forward(arch):
    model = tiny(arch)
    tokens = mx.array([[(5 * i + 1) % 97 for i in range(30)]])
    full = model(tokens)
    cache = model.make_cache()
    parts = [model(tokens[:, a:b], cache) for a, b in ((0, 11), (11, 12), (12, 30))]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=2e-4, rtol=2e-4)


def test_sliding_window_limits_attention():
    # With a window of 8, the last position must not depend on a token 10 positions back, but a global model does.
    # One layer: with more, the receptive field grows by a window per layer.
    local = tiny("gemma3", sliding_window_pattern=100, num_hidden_layers=1)  # every layer local
    a = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    b = mx.array([[7, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    np.testing.assert_allclose(np.array(local(a)[0, -1]), np.array(local(b)[0, -1]), atol=1e-5)
    dense = tiny("llama", num_hidden_layers=1)
    assert not np.allclose(np.array(dense(a)[0, -1]), np.array(dense(b)[0, -1]), atol=1e-5)


def test_sliding_cache_is_bounded():
    model = tiny("gemma3")
    cache = model.make_cache()
    model(mx.array([list(range(40))]), cache)
    for t in range(30):  # decoding appends into the buffer's room, which stays bounded
        model(mx.array([[t]]), cache)
    for layer, c in zip(model.layers, cache):
        if layer.self_attn.window is not None:
            assert c.keys.shape[2] == layer.self_attn.window - 1 and c.start == 70 - c.keys.shape[2]
            assert c.buf_k.shape[2] <= layer.self_attn.window - 1 + SlidingKVCache.step
        else:
            assert c.offset == 70
