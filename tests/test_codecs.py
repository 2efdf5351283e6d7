"""Round trips of the FGS codecs on matrices built to be representable, plus real-weight checks (slow)."""

from __future__ import annotations

import numpy as np
import pytest

import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
from mmt_mlx.fgs.codec import code_nbytes, decode_tensor
from mmt_mlx.fgs.codes import GaussianCode, TensorCode
from mmt_mlx.fgs.encoders import quant as Q
from mmt_mlx.fgs.encoders.circulant import circulant_matvec, decode_circulant, fit_circulant
from mmt_mlx.fgs.encoders.gaussian import column_order, decode_gaussian, fit_gaussian, sigma_grid
from mmt_mlx.fgs.encoders.meta import (
    METHODS,
    best_meta,
    decode_meta,
    encode_meta,
    haar_forward,
    haar_inverse,
    meta_nbytes,
)
from mmt_mlx.fgs.encoders.planner import plan_tensor

mx = pytest.importorskip("mlx.core")


def rel_err(w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(((w - w_hat) ** 2).sum() / (w**2).sum())


# ---------------- quant ----------------


@pytest.mark.parametrize("bits", Q.SUPPORTED_BITS)
@pytest.mark.parametrize("g", Q.SUPPORTED_GROUPS)
def test_quant_matches_mlx_layout(bits: int, g: int) -> None:
    rng = np.random.default_rng(bits * 1000 + g)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    c = Q.quantize(w, bits, g)
    ref = Q.dequantize(c)
    ours = mx.dequantize(
        mx.array(c.wq),
        mx.array(c.scales.astype(np.float32)),
        mx.array(c.biases.astype(np.float32)),
        group_size=g,
        bits=bits,
    )
    np.testing.assert_array_equal(np.array(ours), ref)
    # and MLX's own packed words unpack (and re-pack) identically with our bit stream
    wq, s, b = mx.quantize(mx.array(w), group_size=g, bits=bits)
    wq = np.array(wq)
    q = Q.unpack_bits(wq, bits, 256).reshape(8, 256 // g, g).astype(np.float32)
    mine = (q * np.array(s)[:, :, None] + np.array(b)[:, :, None]).reshape(8, 256)
    np.testing.assert_allclose(
        mine, np.array(mx.dequantize(mx.array(wq), s, b, group_size=g, bits=bits)), atol=1e-6
    )
    np.testing.assert_array_equal(Q.pack_bits(Q.unpack_bits(wq, bits, 256), bits), wq)


@pytest.mark.parametrize("bits", Q.SUPPORTED_BITS)
def test_quant_on_grid_is_exact(bits: int) -> None:
    rng = np.random.default_rng(bits)
    g = 32
    q = rng.integers(0, 2**bits, (16, 128))
    q[:, ::g] = 0  # every group spans its full grid
    q[:, 1::g] = 2**bits - 1
    scale = rng.uniform(0.01, 0.1, (16, 128 // g)).astype(np.float16).astype(np.float32)
    bias = rng.uniform(-1, 1, (16, 128 // g)).astype(np.float16).astype(np.float32)
    w = q.reshape(16, -1, g) * scale[:, :, None] + bias[:, :, None]
    w = w.reshape(16, 128).astype(np.float32)
    c = Q.quantize(w, bits, g)
    np.testing.assert_array_equal(Q.dequantize(c), w)
    assert (
        code_nbytes(c) == Q.quant_nbytes(16, 128, bits, g) == c.wq.nbytes + c.scales.nbytes + c.biases.nbytes
    )


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_grid_search_beats_min_max_and_keeps_exact_grids(bits: int) -> None:
    rng = np.random.default_rng(10 + bits)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    w[:, 7] *= 8  # an outlier column: min/max wastes most of its groups' grid on it
    cw = rng.uniform(0.2, 2.0, 256).astype(np.float32)
    for g in (32, 64):
        plain = Q.quant_error_sq(w, bits, g, cw)
        searched = Q.quant_error_sq(w, bits, g, cw, search=True)
        assert searched < 0.97 * plain
        c = Q.quantize(w, bits, g, cw, search=True)
        d = (w - Q.dequantize(c)) * cw
        assert abs(float((d * d).sum()) - searched) <= 1e-4 * searched  # the code decodes to what was scored
        assert code_nbytes(c) == Q.quant_nbytes(64, 256, bits, g)  # same layout, same bytes
    # a matrix already on a min/max grid stays exact: the search keeps shrink 1.0 where it is best
    q = rng.integers(0, 2**bits, (8, 64))
    q[:, ::32], q[:, 1::32] = 0, 2**bits - 1
    on_grid = (q.reshape(8, 2, 32) * 0.0625 - 0.5).reshape(8, 64).astype(np.float32)
    np.testing.assert_array_equal(Q.dequantize(Q.quantize(on_grid, bits, 32, search=True)), on_grid)


# ---------------- gaussian ----------------


def _bumps(rows: int, cols: int, k: int, seed: int) -> tuple[np.ndarray, list[float]]:
    rng = np.random.default_rng(seed)
    grid = sigma_grid(cols)
    code = GaussianCode(
        rows,
        cols,
        grid,
        rng.standard_normal((rows, k)).astype(np.float16),
        rng.integers(0, cols, (rows, k)).astype(np.uint16),
        rng.integers(0, len(grid), (rows, k)).astype(np.uint8),
    )
    return decode_gaussian(code), grid


def test_gaussian_recovers_bumps() -> None:
    w, grid = _bumps(64, 256, 6, 0)
    c = fit_gaussian(w, 12, grid=grid)
    assert rel_err(w, decode_gaussian(c)) < 5e-3  # greedy pursuit: overlapping bumps are not exact
    assert c.mu.shape == (64, 12) and c.sidx.dtype == np.uint8


def test_gaussian_perm_and_weights() -> None:
    w, grid = _bumps(32, 128, 4, 1)
    perm = np.random.default_rng(2).permutation(128).astype(np.int32)
    wp = np.empty_like(w)
    wp[:, perm] = w  # columns scrambled: W[:, perm] is the smooth matrix again
    c = fit_gaussian(wp, 8, grid=grid, perm=perm, col_weight=np.ones(128, np.float32))
    assert rel_err(wp, decode_gaussian(c)) < 5e-3
    assert column_order(wp).shape == (128,)


# ---------------- meta ----------------


@pytest.mark.parametrize("method", METHODS)
def test_meta_round_trip(method: str) -> None:
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((100, 3)) @ rng.standard_normal((3, 16)) + 0.5).astype(np.float32)
    mc = encode_meta(a, method, rel_err=1e-6, dtype=np.float32)
    assert rel_err(a, decode_meta(mc)) < 2e-6
    if method == "pca":
        assert mc.arrays["coef"].shape[1] <= 3  # rank-3 (after the mean) is found


def test_meta_picks_pca_for_low_rank() -> None:
    rng = np.random.default_rng(4)
    a = (rng.standard_normal((300, 2)) @ rng.standard_normal((2, 24))).astype(np.float32)
    mc = best_meta(a, 1e-3)
    assert mc.method == "pca" and meta_nbytes(mc) < a.size * 2 / 5
    assert np.allclose(haar_inverse(haar_forward(a), 300), a, atol=1e-5)


# ---------------- circulant ----------------


def test_circulant_exact() -> None:
    rng = np.random.default_rng(5)
    b = 8
    c = rng.standard_normal((3, 5, b))
    m = np.arange(b)
    w = c[:, :, (m[:, None] - m[None, :]) % b].transpose(0, 2, 1, 3).reshape(3 * b, 5 * b).astype(np.float32)
    w = w[:21, :37]  # cropped: the fit ignores the padding
    code = fit_circulant(w, b, dtype=np.float32)
    assert np.abs(decode_circulant(code) - w).max() < 1e-5
    x = rng.standard_normal(37)
    assert np.abs(circulant_matvec(code, x) - w @ x).max() < 1e-4


# ---------------- planner ----------------


def test_planner_meets_tau_and_counts_bytes() -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    for tau in (3e-2, 1e-3, 1e-6):
        tc = plan_tensor(w, tau)
        assert isinstance(tc, TensorCode) and tc.errors[-1] <= tau
        assert abs(rel_err(w, decode_tensor(tc)) - tc.errors[-1]) < 1e-3 * tau + 1e-9
    assert len(tc.levels) >= 2  # 1e-6 needs a second overflow level


def test_planner_uses_structure_when_it_pays() -> None:
    b = 16
    rng = np.random.default_rng(7)
    c = rng.standard_normal((8, 8, b))
    m = np.arange(b)
    w = c[:, :, (m[:, None] - m[None, :]) % b].transpose(0, 2, 1, 3).reshape(8 * b, 8 * b).astype(np.float32)
    tc = plan_tensor(w, 1e-4)
    assert tc.levels[0].kind == "circulant" and tc.errors[-1] <= 1e-4
    assert plan_tensor(w, 1e-4, allowed={"quant"}).levels[0].kind == "quant"


def test_planner_col_weight() -> None:
    rng = np.random.default_rng(8)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    cw = rng.uniform(0.1, 3.0, 64).astype(np.float32)
    tc = plan_tensor(w, 1e-2, col_weight=cw)
    d = (w - decode_tensor(tc)) * cw
    assert (d**2).sum() / ((w * cw) ** 2).sum() <= 1e-2


def test_planner_grid_search_meets_tau_in_fewer_bytes() -> None:
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((256, 256)) * rng.uniform(0.5, 2.0, 256)).astype(np.float32)
    w[:, ::37] *= 6  # outlier columns, as real weights have
    cw = rng.uniform(0.2, 2.0, 256).astype(np.float32)
    tau = 3e-2
    plain = plan_tensor(w, tau, col_weight=cw, allowed={"quant"})
    searched = plan_tensor(w, tau, col_weight=cw, allowed={"quant"}, grid_search=True)
    d = (w - decode_tensor(searched)) * cw
    assert (d**2).sum() / ((w * cw) ** 2).sum() <= tau
    assert sum(code_nbytes(lv) for lv in searched.levels) < sum(code_nbytes(lv) for lv in plain.levels)


# ---------------- real weights ----------------


def _smollm2() -> str:
    from mmt_mlx.registry import builtin_path

    return str(builtin_path("smollm2-135m-instruct"))


@pytest.mark.slow
def test_q4_1_requantizes_exactly_and_planner_on_real_tensor() -> None:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(_smollm2())
    seen = 0
    for t in reader.tensors:
        if t.tensor_type.name != "Q4_1" or seen >= 6:
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        c = Q.quantize(w, 4, 32)
        np.testing.assert_array_equal(Q.dequantize(c), w, err_msg=t.name)
        seen += 1
        if seen == 1:
            tc = plan_tensor(w, 1e-2)
            assert rel_err(w, decode_tensor(tc)) <= 1e-2
            assert sum(code_nbytes(lv) for lv in tc.levels) == sum(
                a.nbytes for lv in tc.levels for a in (lv.wq, lv.scales, lv.biases)
            )
    assert seen == 6
