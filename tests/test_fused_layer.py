"""The fused decode layer (one native node per decoder layer for a lone token) against the layers' own ops."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from metal_harness import oracle as O

import mmt_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)
from mmt_mlx import native
from mmt_mlx.cache import KVCache, SlidingKVCache
from mmt_mlx.fgs.codes import TensorCode
from mmt_mlx.fgs.encoders.quant import SUPPORTED_BITS, quantize
from mmt_mlx.fgs.runtime.layers import FGSLinear
from mmt_mlx.testing import tiny_model

needs_native = pytest.mark.skipif(
    native.mode() in ("0", "off", "false", "reference"), reason="MMT_NATIVE disables the native kernels"
)
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))  # fmt: skip


def affine_tiny(arch: str, gaussian: bool = False):
    """A tiny random model whose projections are FGS affine codes of every supported width and several groups;
    with ``gaussian`` every third projection also carries a Gaussian level (as the planner keeps on Gemma)."""
    lm = tiny_model(arch)
    rng = np.random.default_rng(7)
    k = 0
    for block in lm.model.layers:
        for parent, name in PROJECTIONS:
            owner = getattr(block, parent)
            w = np.array(getattr(owner, name).weight)
            bits = SUPPORTED_BITS[k % len(SUPPORTED_BITS)]
            group = 64 if w.shape[1] % 128 else (32, 64, 128)[k % 3]
            k += 1
            levels = [quantize(w, bits, group)]
            if gaussian and k % 3 == 0:
                g = O.random_gaussian(rng, w.shape[0], w.shape[1], 3, grid=[0.5, 2.0, 9.0, 30.0])
                g.amp = g.amp * np.float32(0.05)
                levels.insert(0, g)
            code = TensorCode(shape=w.shape, levels=levels)
            setattr(owner, name, FGSLinear(code))
    mx.eval(lm.model.parameters())
    return lm


def greedy_decode(lm, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list]:
    cache = lm.model.make_cache()
    logits = lm.model(mx.array(prompt)[None], cache)[0, -1]
    out = []
    for _ in range(steps):
        token = int(mx.argmax(logits).item())
        logits = lm.model(mx.array([[token]]), cache)[0, -1]
        out.append(np.array(logits))
    return out, cache


def _count_fused(monkeypatch) -> list[int]:
    calls = [0]
    real = native.decode_layer

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "decode_layer", counting)
    return calls


@needs_native
@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_decode_equals_the_layer_ops_bit_for_bit(arch, gaussian, monkeypatch):
    """Every layer runs as one node (counted), across a KV buffer growth and past Gemma's sliding window, with
    and without Gaussian levels beside the affine ones; the logits and the caches equal those of the separate
    native ops exactly."""
    monkeypatch.setattr(KVCache, "step", 16)  # the 20-token prompt's buffer (32) grows during decoding
    monkeypatch.setattr(SlidingKVCache, "step", 4)  # sliding caches move their keys to a new buffer every 4
    lm = affine_tiny(arch, gaussian)
    prompt, steps = list(range(5, 25)), 14
    monkeypatch.setenv("MMT_FUSED_LAYER", "0")
    want, want_cache = greedy_decode(lm, prompt, steps)
    monkeypatch.setenv("MMT_FUSED_LAYER", "1")
    calls = _count_fused(monkeypatch)
    got, got_cache = greedy_decode(lm, prompt, steps)
    assert calls[0] == steps * len(lm.model.layers)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    for g, w in zip(got_cache, want_cache):
        assert (g.offset, type(g)) == (w.offset, type(w))
        n = g.offset if isinstance(g, KVCache) else g.keys.shape[2]
        assert w.keys.shape[2] >= n
        np.testing.assert_array_equal(np.array(g.keys[..., :n, :]), np.array(w.keys[..., :n, :]))
        np.testing.assert_array_equal(np.array(g.values[..., :n, :]), np.array(w.values[..., :n, :]))
    if arch == "gemma3":
        assert any(isinstance(c, SlidingKVCache) and c.start > 0 for c in got_cache)  # past the window


@needs_native
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_decode_matches_the_mlx_reference_path(arch, monkeypatch):
    """Against MLX's own ops (MMT_NATIVE=0, Gaussian levels included): the integer kernels round x to int16 per
    group (relative error <= 2^-16 a product), which the random tiny layers amplify to ~1e-3 of the logits'
    scale."""
    lm = affine_tiny(arch, gaussian=True)
    got, _ = greedy_decode(lm, list(range(7, 19)), 6)
    monkeypatch.setenv("MMT_NATIVE", "0")
    want, _ = greedy_decode(lm, list(range(7, 19)), 6)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=5e-3 * np.abs(w).max())


@needs_native
def test_layers_it_cannot_take_run_their_ops(monkeypatch):
    """A dense projection (no affine code) keeps its layer on the separate ops; the other layers still fuse, and
    a batch of two rows never does."""
    lm = affine_tiny("llama")
    lm.model.layers[1].mlp.up_proj = tiny_model("llama").model.layers[1].mlp.up_proj  # dense nn.Linear
    calls = _count_fused(monkeypatch)
    got, _ = greedy_decode(lm, list(range(5, 15)), 3)
    assert calls[0] == 3  # layer 0 only
    monkeypatch.setenv("MMT_FUSED_LAYER", "0")
    want, _ = greedy_decode(lm, list(range(5, 15)), 3)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    calls[0] = 0
    monkeypatch.setenv("MMT_FUSED_LAYER", "1")
    lm.model(mx.array([[3], [4]]), lm.model.make_cache())
    assert calls[0] == 0


@needs_native
def test_decode_layer_rejects_bad_operands():
    lm = affine_tiny("llama")
    block = lm.model.layers[0]
    spec = block.fused_spec()
    weights, bits, groups = [], [], []
    for lin in spec.linears:
        ops = lin.fused_operands()
        weights += [ops.wq, ops.scales, ops.biases]
        bits.append(ops.bits)
        groups.append(ops.group_size)
    x = mx.zeros((1, 1, 64))
    cache = mx.zeros((1, 2, 4, 16))
    cfg = dict(heads=4, kv_heads=2, head_dim=16, eps=1e-5, rope_base=1e4, rope_scale=1.0, attn_scale=0.25,
               gelu=False, qk_norm=False, sandwich=False, position=3, cached=3, window=0)  # fmt: skip
    h, k, v = native.decode_layer(x, cache, cache, spec.norms, weights, bits, groups, **cfg)
    assert h.shape == (1, 1, 64) and k.shape == v.shape == (1, 2, 1, 16)
    with pytest.raises(ValueError, match="wrong number"):
        native.decode_layer(x, cache, cache, spec.norms, weights[:-3], bits, groups, **cfg)
    with pytest.raises(ValueError, match="no room"):
        native.decode_layer(x, cache, cache, spec.norms, weights, bits, groups, **{**cfg, "cached": 4},
                            write_cache=True)  # fmt: skip
    with pytest.raises(ValueError, match="caches must be"):
        native.decode_layer(x, cache[..., :8], cache, spec.norms, weights, bits, groups, **cfg)
    with pytest.raises(ValueError, match="wrong rows|do not match"):
        native.decode_layer(x, cache, cache, spec.norms, weights[3:6] + weights[3:], bits, groups, **cfg)


@needs_native
def test_layer_profile_counts_the_fused_layers():
    lm = affine_tiny("llama")
    native.set_layer_profile(True)
    native.take_layer_profile()
    try:
        greedy_decode(lm, list(range(5, 12)), 3)
        prof = native.take_layer_profile()
    finally:
        native.set_layer_profile(False)
    assert prof["layers"] == 3 * len(lm.model.layers)
    assert prof["products"] > 0 and prof["attention"] > 0 and prof["rest"] > 0
    greedy_decode(lm, list(range(5, 12)), 1)
    assert native.take_layer_profile()["layers"] == 0  # off again


@needs_native
def test_mmt_info_says_which_decode_path(monkeypatch, capsys):
    from mmt_mlx.cli import main

    assert main(["info"]) == 0
    assert "one native node per layer for a lone token (MMT_FUSED_LAYER=1)" in capsys.readouterr().out
    monkeypatch.setenv("MMT_FUSED_LAYER", "0")
    assert main(["info"]) == 0
    assert "separate per-op nodes (MMT_FUSED_LAYER=0)" in capsys.readouterr().out
    assert native.describe()["fused_decode_layers"] is False


@needs_native
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_in_place_cache_writes_leave_prompt_cache_entries_intact(arch):
    """The fused node writes each token's key into the KV buffer in place. A prompt-cache entry, a branch that
    reuses part of it and a turn that reuses all of it must each decode as from a cold cache."""
    from mmt_mlx.batch_generate import BatchGenerator
    from mmt_mlx.generate import stream_generate
    from mmt_mlx.prompt_cache import PromptCache
    from mmt_mlx.request import make_request

    lm = affine_tiny(arch)

    def run(gen, prompt):
        uid = gen.add(make_request(lm, prompt, max_tokens=8))
        out = []
        while len(gen):
            out += [ev.chunk for ev in gen.step() if ev.uid == uid]
        return out

    def cold(prompt):
        return [c.token for c in stream_generate(lm, prompt, max_tokens=8)]

    gen = BatchGenerator(lm, max_batch=1, prompt_cache=PromptCache())
    first = list(range(200, 230))
    out1 = run(gen, first)
    assert [c.token for c in out1] == cold(first)
    branch = first[:20] + [5, 6, 7]  # reuses part of the entry, then writes its own keys
    assert [c.token for c in run(gen, branch)] == cold(branch)
    turn2 = first + [c.token for c in out1] + [9, 10, 11]  # reuses the whole first entry
    warm = run(gen, turn2)
    assert warm[0].cached_tokens > 0
    assert [c.token for c in warm] == cold(turn2)
