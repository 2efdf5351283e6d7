"""FGSLinear / FGSEmbedding on the reference path: values against the numpy oracle, backend choice, memory."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from metal_harness import oracle as O

import mmt_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)
from mmt_mlx.fgs.codes import MetaCode, TensorCode
from mmt_mlx.fgs.runtime import kernels as K
from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear


def _code(rng: np.random.Generator, rows: int, cols: int) -> TensorCode:
    levels = [
        O.random_gaussian(rng, rows, cols, 4),
        O.random_circulant(rng, rows, cols, 4),
        O.random_quant(rng, rows, cols, 4, 32),
    ]
    return TensorCode(shape=(rows, cols), levels=levels)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(1e-6, np.abs(want).max()))


def test_linear_matches_oracle():
    rng = np.random.default_rng(0)
    code = _code(rng, 50, 96)
    bias = rng.normal(size=50).astype(np.float32)
    lin = FGSLinear(code, bias=bias, use_kernel=False)
    w = O.decode_tensor(code)
    for shape in [(96,), (1, 96), (2, 7, 96)]:
        x = rng.normal(size=shape).astype(np.float32)
        y = np.array(lin(mx.array(x)))
        assert y.shape == shape[:-1] + (50,)
        assert _rel(y, x.astype(np.float64) @ w.T + bias) < 5e-5


def test_linear_meta_amplitudes():
    rng = np.random.default_rng(1)
    g = O.random_gaussian(rng, 30, 40, 3)
    mean, coef, basis = rng.normal(size=3), rng.normal(size=(30, 2)), rng.normal(size=(2, 3))
    g.amp = MetaCode(
        "pca",
        30,
        3,
        {"mean": mean.astype(np.float32), "coef": coef.astype(np.float32), "basis": basis.astype(np.float32)},
    )
    lin = FGSLinear(TensorCode((30, 40), [g]), use_kernel=False)
    dense = g.__class__(**{**g.__dict__, "amp": (mean[None] + coef @ basis).astype(np.float32)})
    x = rng.normal(size=(3, 40)).astype(np.float32)
    assert _rel(np.array(lin(mx.array(x))), x @ O.decode_gaussian(dense).T) < 5e-5


def test_embedding_rows_and_tied_head():
    rng = np.random.default_rng(2)
    code = _code(rng, 77, 64)
    emb = FGSEmbedding(code, use_kernel=False)
    w = O.decode_tensor(code)
    ids = np.array([[0, 76, 5], [5, 13, 40]], dtype=np.int32)
    out = np.array(emb(mx.array(ids)))
    assert out.shape == (2, 3, 64)
    assert _rel(out, w[ids]) < 5e-5
    x = rng.normal(size=(4, 64)).astype(np.float32)
    assert _rel(np.array(emb.as_linear(mx.array(x))), x @ w.T) < 5e-5


def test_backend_env(monkeypatch):
    monkeypatch.setenv("MMT_FGS_BACKEND", "reference")
    assert K.use_kernels() is False
    monkeypatch.setenv("MMT_FGS_BACKEND", "kernel")
    assert K.use_kernels() is True
    monkeypatch.setenv("MMT_FGS_BACKEND", "bogus")
    with pytest.raises(ValueError):
        K.use_kernels()
    monkeypatch.delenv("MMT_FGS_BACKEND")
    assert K.use_kernels() is (K.gpu_backend() is not None)


@pytest.mark.skipif(K.gpu_backend() is not None, reason="checks the no-GPU behaviour")
def test_forced_kernel_without_gpu_raises():
    rng = np.random.default_rng(3)
    lin = FGSLinear(TensorCode((8, 16), [O.random_gaussian(rng, 8, 16, 2)]), use_kernel=True)
    with pytest.raises((RuntimeError, ValueError)):
        mx.eval(lin(mx.ones((16,))))


def test_forward_memory_stays_below_dense():
    """8192 x 8192 with a 4-bit quant level and a Gaussian level: dense f32 would be 256 MiB."""
    rng = np.random.default_rng(4)
    n = 8192
    levels = [O.random_gaussian(rng, n, n, 8, grid=[0.7, 2.0, 6.0]), O.random_quant(rng, n, n, 4, 64)]
    lin = FGSLinear(TensorCode((n, n), levels), use_kernel=False)
    mx.eval(lin.parameters())
    dense_bytes = n * n * 4
    for tokens in (1, 16, 64):
        x = mx.array(rng.normal(size=(tokens, n)).astype(np.float32))
        mx.eval(x)
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        y = lin(x)
        mx.eval(y)
        extra = mx.get_peak_memory() - base
        assert y.shape == (tokens, n) and bool(mx.all(mx.isfinite(y)))
        assert extra < dense_bytes / 6, f"{tokens} tokens: forward used {extra / 2**20:.1f} MiB"
