"""The rotq level: FFT rotation, Gaussian codebooks, GPTQ rounding, the MLX product, the file, --bpw planning."""

import mlx.core as mx
import numpy as np
import pytest

from mmt_mlx.errors import MmtError
from mmt_mlx.fgs import format as fgs_format
from mmt_mlx.fgs.codes import TensorCode
from mmt_mlx.fgs.encoders.gauss_codes import (
    check_layout,
    decode_rotated,
    decode_rotq,
    encode_rotq,
    lloyd_max,
    output_error,
    rotq_code_nbytes,
    rotq_nbytes,
)
from mmt_mlx.fgs.encoders.quant import unpack_bits
from mmt_mlx.fgs.encoders.rotation import rotate, rotate_covariance, rotation_params, unrotate
from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear
from mmt_mlx.rotq_convert import allocate, gaussian_distortion


@pytest.mark.parametrize("n", [1, 2, 7, 64, 576, 577, 640])
def test_rotation_is_orthogonal_and_real(n):
    r = rotate(np.eye(n), 11)  # row i = R e_i, i.e. R^T
    assert r.dtype == np.float64
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-5)
    x = np.random.default_rng(0).standard_normal((3, n))
    np.testing.assert_allclose(unrotate(rotate(x, 11), 11), x, atol=1e-5)
    signs, phase = rotation_params(n, 11)
    np.testing.assert_allclose(np.abs(phase), 1, atol=1e-6)
    assert phase[0].imag == 0 and (n % 2 or phase[-1].imag == 0)


def test_rotation_depends_on_seed_and_spreads_outliers():
    x = np.zeros(576)
    x[3] = 1.0
    a, b = rotate(x, 1), rotate(x, 2)
    assert not np.allclose(a, b)
    assert np.abs(a).max() < 0.3  # a spike becomes a spread-out vector of the same norm
    np.testing.assert_allclose(np.linalg.norm(a), 1, atol=1e-6)


def test_rotated_covariance_matches_rotated_inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 64)) * np.linspace(0.1, 3, 64)
    h = x.T @ x
    xr = rotate(x, 5)
    np.testing.assert_allclose(rotate_covariance(h, 5), xr.T @ xr, rtol=1e-6, atol=1e-6)


def test_lloyd_max_levels():
    np.testing.assert_allclose(lloyd_max(2)[2:], [0.4528, 1.5104], atol=2e-3)
    np.testing.assert_allclose(lloyd_max(3)[4:], [0.2451, 0.7560, 1.3440, 2.1520], atol=2e-3)
    d = [gaussian_distortion(b) for b in (2, 3, 4, 5)]
    np.testing.assert_allclose(d[:2], [0.1175, 0.03454], rtol=0.03)
    assert all(a > 3 * b for a, b in zip(d, d[1:]))


def test_layout_checks():
    with pytest.raises(ValueError):
        check_layout(100, 3, 64)
    with pytest.raises(ValueError):
        check_layout(128, 7, 64)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_encode_round_trip_and_bytes(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((40, 128)).astype(np.float32)
    code = encode_rotq(w, bits, 64, seed=3)
    q = unpack_bits(code.wq, bits, 128)
    assert q.max() < 2**bits
    assert rotq_code_nbytes(code) == rotq_nbytes(40, 128, bits, 64)
    wr = decode_rotated(code)
    cb = lloyd_max(bits)
    np.testing.assert_allclose(wr[:, :64], cb[q[:, :64]] * code.scales[:, :1].astype(np.float32), rtol=1e-6)
    # un-rotating the decode reproduces W up to the codebook's distortion of a Gaussian
    err = output_error(w, decode_rotq(code), None)
    assert err < 1.6 * gaussian_distortion(bits)


def test_gptq_beats_plain_rounding_on_correlated_inputs():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((128, 128)) * 0.3 + np.eye(128)
    x = rng.standard_normal((2000, 128)) @ mix * np.exp(rng.standard_normal(128))
    h = x.T @ x / len(x)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    w[:, 7] *= 15  # an outlier column: the rotation spreads it
    plain = output_error(w, decode_rotq(encode_rotq(w, 3, 64, 1)), h)
    gptq = output_error(w, decode_rotq(encode_rotq(w, 3, 64, 1, h)), h)
    assert gptq < 0.7 * plain


def _code(rows=96, cols=128, bits=3, seed=9):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return w, encode_rotq(w, bits, 64, seed)


@pytest.mark.parametrize("tokens", [1, 5])
def test_mlx_product_matches_numpy_decode(tokens, monkeypatch):
    from mmt_mlx.fgs.runtime import rotq_layer

    monkeypatch.setenv(
        "MMT_NATIVE", "0"
    )  # the MLX reference path (tests/test_native.py checks the native one)
    monkeypatch.setattr(rotq_layer, "_TILE_ELEMS", 128 * 40)  # several tiles, the last one partial
    _, code = _code()
    dense = decode_rotq(code)
    lin = FGSLinear(TensorCode((96, 128), [code]), use_kernel=False)
    x = np.random.default_rng(1).standard_normal((1, tokens, 128)).astype(np.float32)
    y = np.asarray(lin(mx.array(x)))
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-4, atol=1e-4)


def test_shared_input_reuses_one_rotation(monkeypatch):
    monkeypatch.setenv("MMT_NATIVE", "0")  # float64-tight comparisons: the reference product
    _, c1 = _code(seed=4)
    _, c2 = _code(seed=4)
    a, b = FGSLinear(TensorCode((96, 128), [c1])), FGSLinear(TensorCode((96, 128), [c2]))
    x = mx.array(np.random.default_rng(2).standard_normal((1, 3, 128)).astype(np.float32))
    ya, yb = a(x), b(x)
    np.testing.assert_allclose(np.asarray(yb), np.asarray(x) @ decode_rotq(c2).T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ya), np.asarray(x) @ decode_rotq(c1).T, rtol=1e-4, atol=1e-4)


def test_embedding_rows_and_tied_head(monkeypatch):
    monkeypatch.setenv("MMT_NATIVE", "0")  # float64-tight comparisons: the reference product
    _, code = _code(rows=200, cols=64 * 2, bits=4)
    dense = decode_rotq(code)
    emb = FGSEmbedding(TensorCode((200, 128), [code]))
    ids = mx.array([[0, 199, 17, 17]])
    np.testing.assert_allclose(np.asarray(emb(ids))[0], dense[[0, 199, 17, 17]], rtol=1e-4, atol=1e-5)
    h = np.random.default_rng(3).standard_normal((2, 128)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(emb.as_linear(mx.array(h))), h @ dense.T, rtol=1e-4, atol=1e-4)


def test_file_round_trip(tmp_path):
    _, code = _code(bits=5)
    out = fgs_format.save_fgs_model(
        tmp_path / "m", arch="llama", config={}, codes={"w": TensorCode((96, 128), [code], [0.01])}, raw={},
        tokenizer={}, tokenizer_files={}, report={},
    )  # fmt: skip
    _, codes, _ = fgs_format.load_fgs_model(out)
    got = codes["w"].levels[0]
    assert (got.kind, got.bits, got.seed, got.group_size) == ("rotq", 5, code.seed, 64)
    np.testing.assert_array_equal(decode_rotq(got), decode_rotq(code))


def test_allocate_spends_budget_where_it_buys_most():
    def cost(c2):
        return {(b, 64): c2 * r for b, r in zip((2, 3, 4, 5), (1.0, 0.3, 0.08, 0.02))}

    items = {
        "cheap": {"rows": 64, "cols": 128, "cost": cost(1.0)},
        "costly": {"rows": 64, "cols": 128, "cost": cost(10.0)},
    }
    floor = 2 * rotq_nbytes(64, 128, 2, 64, True)
    step = rotq_nbytes(64, 128, 3, 64, True) - rotq_nbytes(64, 128, 2, 64, True)
    got = allocate(items, floor + 2 * step + 64)
    assert got == {"cheap": (2, 64), "costly": (4, 64)}
    assert sum(rotq_nbytes(64, 128, b, g, True) for b, g in got.values()) <= floor + 2 * step + 64


def test_allocate_buys_a_smaller_group_when_it_saves_more_per_byte():
    """Per tensor the options are (bits, group): halving the group costs 8 bits per 32 weights (log scales),
    a code bit 32; the planner takes whichever saves more predicted KL per byte."""
    base = {(2, 64): 1.0, (3, 64): 0.3, (4, 64): 0.08}
    items = {
        "groupy": {"rows": 64, "cols": 128, "cost": base | {(2, 32): 0.5, (3, 32): 0.15, (4, 32): 0.04}},
        "plain": {"rows": 64, "cols": 128, "cost": base | {(2, 32): 0.99, (3, 32): 0.29, (4, 32): 0.079}},
    }
    floor = 2 * rotq_nbytes(64, 128, 2, 64, True)
    half = rotq_nbytes(64, 128, 2, 32, True) - rotq_nbytes(64, 128, 2, 64, True)
    got = allocate(items, floor + half)
    assert got == {"groupy": (2, 32), "plain": (2, 64)}
    with pytest.raises(MmtError, match="floor"):
        allocate(items, floor - 1)


def test_log_scale_codes_cost_half_and_lose_nothing_measurable(tmp_path):
    """8-bit log-scale codes under a per-row f16 top: the stored bytes are what rotq_nbytes says, the scales
    are within half a grid step (0.55%) of the f16 ones, the output error within 2% of the f16 code's, and the
    file keeps them exactly."""
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((128, 128)) * 0.3 + np.eye(128)
    x = rng.standard_normal((2000, 128)) @ mix
    h = x.T @ x / len(x)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    f16 = encode_rotq(w, 4, 32, 7, h)
    log = encode_rotq(w, 4, 32, 7, h, log_scales=True)
    assert log.scales.dtype == np.uint8 and log.row_scale.dtype == np.float16 and log.row_scale.shape == (96,)
    assert rotq_code_nbytes(log) == rotq_nbytes(96, 128, 4, 32, True) < rotq_code_nbytes(f16)
    assert rotq_code_nbytes(f16) == rotq_nbytes(96, 128, 4, 32)
    s = log.group_scales()
    assert s.dtype == np.float32 and s.shape == (96, 4)
    assert (
        1 < len(np.unique(log.scales)) and log.scales.min() > 0 and log.scales.max() < 255
    )  # inside the grid
    np.testing.assert_allclose(
        s, log.row_scale.astype(np.float32)[:, None] * 2.0 ** (-log.scales.astype(np.float64) / 64), rtol=1e-6
    )
    e16 = output_error(w, decode_rotq(f16), h)
    elog = output_error(w, decode_rotq(log), h)
    assert elog < 1.02 * e16, (elog, e16)
    out = fgs_format.save_fgs_model(
        tmp_path / "m", arch="llama", config={}, raw={}, tokenizer={}, tokenizer_files={},
        codes={"w": TensorCode((96, 128), [log], [elog])}, report={},
    )  # fmt: skip
    _, codes, _ = fgs_format.load_fgs_model(out)
    got = codes["w"].levels[0]
    np.testing.assert_array_equal(got.scales, log.scales)
    np.testing.assert_array_equal(got.row_scale, log.row_scale)
    np.testing.assert_array_equal(decode_rotq(got), decode_rotq(log))


def test_convert_bpw_end_to_end(tiny_gguf, tmp_path):
    from mmt_mlx.build import load_fgs
    from mmt_mlx.convert import convert_bpw
    from mmt_mlx.fgs.codec import decode_tensor
    from mmt_mlx.locate import load_source

    _, src = load_source(tiny_gguf["llama"][0])
    out = tmp_path / "rot"
    report = convert_bpw(src, out, 3.5, progress=False, calib_tokens=512)
    assert report["bits_per_weight"] <= 3.5
    assert report["bits_per_weight"] > 3.0  # the budget is spent, not left over
    _, codes, _ = fgs_format.load_fgs_model(out)
    assert all(tc.levels[0].kind == "rotq" for tc in codes.values())
    # the vocabulary rows in bands by token importance, the important ones at no fewer bits
    bands = report["classes"]["embed_tokens"]["row_bands"]
    assert len(bands) == 5 and sum(b["rows"] for b in bands) == 49152
    assert bands[0]["bits_per_weight"] >= bands[-1]["bits_per_weight"]
    emb = next(tc for k, tc in codes.items() if "embed" in k)
    assert len(emb.levels) == 5 and emb.errors[-1] < emb.errors[0]
    c = report["classes"]["self_attn.v_proj"]
    assert set(c) >= {"levels", "bytes", "mean_output_error", "predicted_kl"}
    # the error the report states is the error of the stored code
    name = "model.layers.0.mlp.down_proj.weight" if "model.layers.0.mlp.down_proj.weight" in codes else None
    name = name or next(k for k in codes if "down_proj" in k)
    w_hat = decode_tensor(codes[name])
    assert np.isfinite(w_hat).all() and w_hat.shape == src.weights[name].shape
    lm = load_fgs(out, "rot")
    logits = lm.model(mx.array([[1, 2, 3, 4]]), lm.model.make_cache())
    assert logits.shape[-1] == 49152 and bool(mx.all(mx.isfinite(logits)))
    # Apple estimate: on a GPU each rotq product and decode rotation is one kernel, fewer than the MLX path's ops
    from mmt_mlx import apple_estimate

    on_kernels, on_ops = (
        apple_estimate.count_kernels(lm.model),
        apple_estimate.count_kernels(lm.model, fgs_kernels=False),
    )
    layers = len(lm.model.layers)
    assert 14 * layers <= on_kernels < on_ops
    assert not any(getattr(m, "use_kernel", False) for m in lm.model.modules())  # restored
    after = lm.model(mx.array([[1, 2, 3, 4]]), lm.model.make_cache())
    np.testing.assert_array_equal(np.array(after), np.array(logits))


def test_cli_bpw_and_its_errors(tiny_gguf, tmp_path, capsys):
    import json

    from mmt_mlx.cli import main

    path = tiny_gguf["llama"][0]
    assert main(["convert", path, "-o", str(tmp_path / "a"), "--bpw", "0.5", "--no-eval"]) == 1
    assert "--bpw must be" in capsys.readouterr().err
    assert main(["convert", path, "-o", str(tmp_path / "b"), "--bpw", "3", "--tau", "0.01"]) == 1
    assert "one of --tau, --preset, --bpw" in capsys.readouterr().err
    assert main(["convert", path, "-o", str(tmp_path / "b"), "--codes", "scalar", "--tau", "0.01"]) == 1
    assert "--codes chooses the rotated Gaussian codes" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    out = tmp_path / "c"
    assert main(["convert", path, "-o", str(out), "--preset", "rot3", "--no-eval", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["preset"] == "rot3" and report["bits_per_weight"] <= 3.25
    assert "trellis" in report["method"]  # the default codes
    assert all(k.startswith("tcq") for c in report["classes"].values() for k in c["levels"])
    out = tmp_path / "d"
    assert (
        main(["convert", path, "-o", str(out), "--bpw", "3.25", "--codes", "scalar", "--no-eval", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(k.startswith("rotq") for c in report["classes"].values() for k in c["levels"])
    assert "row_bands" in report["classes"]["embed_tokens"]
    out = tmp_path / "e"
    assert main(["convert", path, "-o", str(out), "--vocab-rows", "whole", "--tau", "0.01", "--no-eval"]) == 1
    assert "--vocab-rows chooses" in capsys.readouterr().err
    assert (
        main(["convert", path, "-o", str(out), "--bpw", "3", "--vocab-rows", "whole", "--no-eval", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "row_bands" not in report["classes"]["embed_tokens"]
    assert sum(report["classes"]["embed_tokens"]["levels"].values()) == 1


def _bits(level: str) -> int:  # "tcq3g64" -> 3
    return int(level[3 : level.index("g")])


def test_no_vocabulary_band_below_the_whole_plan(tiny_gguf, monkeypatch):
    """With all importance on 100 tokens the other rows' bands are priced at nothing: without the floor they would
    stay at the fewest bits; with it none is below the width of the embedding coded whole at the same budget."""
    from mmt_mlx.locate import load_source
    from mmt_mlx.rotq_calibrate import TokenImportance
    from mmt_mlx.rotq_convert import encode_bpw

    def concentrated(self) -> np.ndarray:
        w = np.zeros(len(self.p))
        w[:100] = 1.0
        return w / w.sum()

    monkeypatch.setattr(TokenImportance, "weights", concentrated)
    _, src = load_source(tiny_gguf["llama"][0])
    _, _, whole = encode_bpw(src, 4.0, progress=False, calib_tokens=512, row_bands=False)
    _, _, banded = encode_bpw(src, 4.0, progress=False, calib_tokens=512)
    (level,) = whole["classes"]["embed_tokens"]["levels"]
    bands = [_bits(b["level"]) for b in banded["classes"]["embed_tokens"]["row_bands"]]
    assert _bits(level) > 2 and min(bands) >= _bits(level) and bands[0] > _bits(level)


def test_codes_wider_than_the_trellis_only_above_six_bits(tiny_gguf, monkeypatch):
    """A target above 6 bits per weight may buy scalar 8-bit codes (the trellis stops at 6); every narrower target
    plans from the same widths as before. The 8-bit codes run on both paths."""
    from mmt_mlx.locate import load_source
    from mmt_mlx.rotq_convert import encode_bpw

    _, src = load_source(tiny_gguf["llama"][0])
    codes, _, report = encode_bpw(src, 7.5, progress=False, calib_tokens=512)
    wide = [lv for tc in codes.values() for lv in tc.levels if lv.bits == 8]
    assert wide and all(lv.trellis == 0 and lv.codebook.size == 256 for lv in wide)
    assert 6.5 < report["bits_per_weight"] <= 7.5
    codes6, _, _ = encode_bpw(src, 6.0, progress=False, calib_tokens=512)
    assert max(lv.bits for tc in codes6.values() for lv in tc.levels) <= 6
    lv = next(lv for lv in wide if lv.row_mask is None)  # a whole tensor (not a vocabulary band)
    dense = decode_rotq(lv)
    x = np.random.default_rng(2).standard_normal((1, 3, lv.cols)).astype(np.float32)
    for mode in ("0", "auto"):  # the MLX reference path, then the native integer GEMM
        monkeypatch.setenv("MMT_NATIVE", mode)
        y = np.asarray(FGSLinear(TensorCode((lv.rows, lv.cols), [lv]), use_kernel=False)(mx.array(x)))
        tol = (1e-4 if mode == "0" else 1e-3) * (np.abs(x) @ np.abs(dense).T) + 1e-5
        assert (np.abs(y - x @ dense.T) <= tol).all()


def test_scale_refit_lowers_the_weighted_error():
    """Re-solving the group scales for GPTQ's codes never raises a row's output error, and lowers the total."""
    from mmt_mlx.fgs.encoders.gauss_codes import decode_rotated, lloyd_max, refit_scales, row_errors
    from mmt_mlx.fgs.encoders.rotation import rotate_weight

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2048, 192)) * np.exp(rng.normal(size=192))  # anisotropic inputs, as in real layers
    h = x.T @ x / len(x)
    w = (rng.standard_t(4, size=(40, 192)) * 0.02).astype(np.float32)
    for bits in (2, 3, 4):
        plain = encode_rotq(w, bits, 64, 5, h, refit=False)
        wr, hr = rotate_weight(w, 5), rotate_covariance(h, 5)
        v = lloyd_max(bits)[unpack_bits(plain.wq, bits, 192)]
        s = refit_scales(wr, hr, v, plain.scales.astype(np.float32), 64)
        before, after = row_errors(wr, v, plain.scales.astype(np.float32), hr), row_errors(wr, v, s, hr)
        assert (after <= before * (1 + 1e-9)).all() and after.sum() < 0.99 * before.sum(), bits
        refit = encode_rotq(w, bits, 64, 5, h)  # the default refits
        np.testing.assert_array_equal(refit.scales, s.astype(np.float16))
        assert np.allclose(decode_rotated(refit), v * np.repeat(s, 64, axis=1), rtol=1e-3, atol=1e-6)


def test_distilled_scales_lower_the_kl_and_keep_the_format(tiny_gguf, tmp_path, monkeypatch):
    """The student (codes fixed, group gains trained) starts as the stored model; distillation lowers its KL
    from the dense model on the training windows and writes scales the runtime loads."""
    from mmt_mlx.build import load_fgs, model_from_source
    from mmt_mlx.convert import convert_bpw
    from mmt_mlx.locate import load_source
    from mmt_mlx.rotq_distill import _students, distill_scales

    _, src = load_source(tiny_gguf["llama"][0])
    out = tmp_path / "plain"
    convert_bpw(src, out, 2.5, progress=False, calib_tokens=512)
    _, codes, _ = fgs_format.load_fgs_model(out)
    x = mx.array([[5, 17, 300, 2, 41, 9]])
    # at zero gain the student's logits are the stored model's
    student = model_from_source(src, "s").model
    _students(student, codes)
    stored = load_fgs(out, "rot").model
    with monkeypatch.context() as m:
        m.setenv("MMT_NATIVE", "0")  # the stored model on the MLX reference path, as the student computes
        want = stored(x, stored.make_cache())
        mx.eval(want)
    np.testing.assert_allclose(
        np.array(student(x, student.make_cache())), np.array(want), rtol=1e-3, atol=1e-3
    )
    before = {k: tc.levels[0].scales.copy() for k, tc in codes.items()}
    rng = np.random.default_rng(0)
    chunks = [[1] + rng.integers(2, 49152, size=64).tolist() for _ in range(2)]
    info = distill_scales(lambda: model_from_source(src, "d").model, codes, chunks, 24, lr=3e-3, seq=64,
                          progress=False)  # fmt: skip
    assert info["kl_after"] < 0.9 * info["kl_before"], info
    # the tuned scales are stored as the planner's were: log-scale codes under the same row tops
    assert all(
        tc.levels[0].scales.dtype == np.uint8 and tc.levels[0].row_scale is not None for tc in codes.values()
    )
    assert any(not np.array_equal(before[k], tc.levels[0].scales) for k, tc in codes.items())
    # through convert: the report says what distillation did, the file loads and runs
    d = tmp_path / "distilled"
    report = convert_bpw(src, d, 2.5, progress=False, calib_tokens=512, distill_steps=3)
    assert report["distill"]["steps"] == 3 and "distillation" in report["stage_seconds"]
    lm = load_fgs(d, "rot")
    assert bool(mx.all(mx.isfinite(lm.model(x, lm.model.make_cache()))))
    from mmt_mlx.cli import main

    assert main(["convert", tiny_gguf["llama"][0], "-o", str(tmp_path / "e"), "--distill", "5"]) == 1
    assert not (tmp_path / "e").exists()
