"""Apple decode estimates: kernels counted in a real decode graph, dispatch time included."""

from __future__ import annotations

import os

import mlx.core as mx

from mmt_mlx import apple_estimate as A
from mmt_mlx.testing import tiny_model


def test_kernel_count_is_gpu_like_and_leaves_mlx_untouched():
    lm = tiny_model("llama")
    rms, native_env = mx.fast.rms_norm, os.environ.get("MMT_NATIVE")
    n = A.count_kernels(lm.model)
    layers = len(lm.model.layers)
    # per layer at least: 2 norms, 7 projections, 2 RoPE, attention, 2 cache writes; at most a few dozen
    assert 14 * layers <= n <= 40 * layers + 20
    assert mx.fast.rms_norm is rms and os.environ.get("MMT_NATIVE") == native_env


def test_dispatch_time_bounds_small_models():
    fast = A.decode_tok_s(1e6, 120e9, 0)
    slow = A.decode_tok_s(1e6, 120e9, 400)
    assert fast == 120e9 / 1e6 and slow < 1 / (400 * A.DISPATCH_S)
