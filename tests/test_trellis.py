"""Trellis-coded rotq codes (fgs/encoders/trellis.py): the search, its native twin, the decode on every path."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mmt_mlx import native
from mmt_mlx.fgs import format as fgs_format
from mmt_mlx.fgs.codes import TensorCode
from mmt_mlx.fgs.encoders.gauss_codes import decode_rotated, decode_rotq, encode_rotq, output_error
from mmt_mlx.fgs.encoders.lloyd_max import lloyd_max
from mmt_mlx.fgs.encoders.trellis import (
    _training_values,
    tcq_codebook,
    tcq_distortion,
    tcq_quantize,
    trellis_states,
    viterbi_reference,
)
from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear


def _brute_force(t, w, lut, bits, state0):
    """Every code sequence of a short t: the best total error (the Viterbi search must find it)."""
    n, k = len(t), 1 << bits
    best = np.inf
    for flat in range(k**n):
        codes = [(flat // k**i) % k for i in range(n)]
        s, err = state0, 0.0
        for i, c in enumerate(codes):
            err += w[i] * (t[i] - lut[(s << bits) | c]) ** 2
            s = ((s << 1) | (c & 1)) & 3
        best = min(best, err)
    return best


@pytest.mark.parametrize("state0", [0, 3])
def test_viterbi_finds_the_best_sequence(state0):
    rng = np.random.default_rng(state0)
    lut = tcq_codebook(2)
    t = rng.standard_normal(5).astype(np.float32)
    w = rng.uniform(0.2, 2.0, 5).astype(np.float32)
    codes, err = viterbi_reference(t[None], lut, 2, w[None], np.array([state0]))
    states = trellis_states(codes.T, np.array([[state0 >> 1], [state0 & 1]])).T
    got = (w * (t - lut[(states.astype(np.int64) << 2) | codes[0]]) ** 2).sum()
    assert got == pytest.approx(err[0], rel=1e-5)
    assert err[0] == pytest.approx(_brute_force(t, w, lut, 2, state0), rel=1e-5)


@pytest.mark.skipif(not native.available(), reason="the native extension is not built here")
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_native_search_equals_the_reference(bits):
    rng = np.random.default_rng(bits)
    lut = tcq_codebook(bits)
    for n in (1, 2, 7, 513):
        t = (rng.standard_normal(n) * 1.3).astype(np.float32)
        w = rng.uniform(0.0, 2.0, n).astype(np.float32)
        for s0 in range(4):
            ref = viterbi_reference(t[None], lut, bits, w[None], np.array([s0]))[0][0]
            np.testing.assert_array_equal(native.tcq_quantize(t, w, lut, bits, s0), ref)
            np.testing.assert_array_equal(tcq_quantize(t, w, lut, bits, s0), ref)


@pytest.mark.parametrize("bits", [2, 4])
def test_trellis_codes_fit_gaussian_groups_better_than_lloyd_max(bits):
    t = _training_values(np.random.default_rng(100 + bits), 400, 256).ravel()
    levels = lloyd_max(bits)
    scalar = np.mean((t - levels[np.argmin(np.abs(t[:, None] - levels[None]), axis=1)]) ** 2)
    assert 10 * np.log10(scalar / tcq_distortion(bits)) > 1.1  # measured 1.19 dB (2 bits), 1.43 (4 bits)


def _layer(rows=96, cols=128, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    x = rng.standard_normal((3000, cols)) @ mix * np.exp(0.5 * rng.standard_normal(cols))
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return w, x.T @ x / len(x)


@pytest.mark.parametrize("bits", [2, 4])
def test_gptq_with_trellis_codes_beats_scalar_codes(bits):
    w, h = _layer()
    scalar = output_error(w, decode_rotq(encode_rotq(w, bits, 64, 5, h, log_scales=True)), h)
    code = encode_rotq(w, bits, 64, 5, h, log_scales=True, trellis=True)
    assert code.trellis == 2 and code.codebook.shape == (4 << bits,)
    trellis = output_error(w, decode_rotq(code), h)
    assert trellis < 0.85 * scalar  # measured 0.76 (2 bits), 0.79 (4 bits) in groups of 64
    plain = output_error(w, decode_rotq(encode_rotq(w, bits, 64, 5, None, trellis=True)), h)
    assert trellis < plain  # the error feedback still pays with trellis codes


def test_row_slices_decode_as_the_whole():
    w, h = _layer(rows=4100, cols=64, seed=2)  # three GPTQ row blocks: the trellis runs on across them
    code = encode_rotq(w, 3, 32, 1, h, log_scales=True, trellis=True)
    whole = decode_rotated(code)
    for a, b in ((0, 5), (1, 9), (2, 3), (2047, 2051), (4095, 4100)):
        np.testing.assert_array_equal(decode_rotated(code, slice(a, b)), whole[a:b])


@pytest.fixture(params=["mlx", "native"])
def path(request, monkeypatch):
    # the MLX reference path, and the native kernels where they are built (int16 levels: a looser tolerance)
    monkeypatch.setenv("MMT_NATIVE", "0" if request.param == "mlx" else "auto")
    return request.param


@pytest.mark.parametrize("tokens", [1, 5])
def test_mlx_product_embedding_and_head_match_numpy(tokens, path, monkeypatch):
    from mmt_mlx.fgs.runtime import rotq_layer

    monkeypatch.setattr(rotq_layer, "_TILE_ELEMS", 128 * 40)  # several tiles, the last one partial
    w, h = _layer(rows=203, cols=128, seed=3)
    code = encode_rotq(w, 4, 64, 7, h, log_scales=True, trellis=True)
    dense = decode_rotq(code)
    lin = FGSLinear(TensorCode((203, 128), [code]))
    x = np.random.default_rng(1).standard_normal((1, tokens, 128)).astype(np.float32)
    # the native product rounds the levels to 1/2047 of the largest and x to int16: within 1e-3 of sum |x w|
    tol = (1e-4 if path == "mlx" else 1e-3) * (np.abs(x) @ np.abs(dense).T) + 1e-5
    assert (np.abs(np.asarray(lin(mx.array(x))) - x @ dense.T) <= tol).all()
    emb = FGSEmbedding(TensorCode((203, 128), [code]))
    ids = [0, 1, 2, 202, 17, 17, 41]
    np.testing.assert_allclose(np.asarray(emb(mx.array([ids])))[0], dense[ids], rtol=1e-4, atol=1e-5)
    assert (np.abs(np.asarray(emb.as_linear(mx.array(x[0]))) - x[0] @ dense.T) <= tol[0]).all()


def test_file_round_trip_and_version(tmp_path):
    w, h = _layer(rows=64, cols=128, seed=4)
    code = encode_rotq(w, 3, 64, 2, h, log_scales=True, trellis=True)
    scalar = encode_rotq(w, 3, 64, 2, h, log_scales=True)
    kw = dict(arch="llama", config={}, raw={}, tokenizer={}, tokenizer_files={}, report={})
    out = fgs_format.save_fgs_model(tmp_path / "t", codes={"w": TensorCode((64, 128), [code])}, **kw)
    manifest, codes, _ = fgs_format.load_fgs_model(out)
    assert manifest["format_version"] == fgs_format.TRELLIS_VERSION
    got = codes["w"].levels[0]
    assert got.trellis == 2
    np.testing.assert_array_equal(decode_rotq(got), decode_rotq(code))
    manifest["tensors"]["w"]["levels"][0]["trellis"] = 3  # a kind of trellis this version does not know
    (out / fgs_format.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(fgs_format.ModelFormatError, match="unknown trellis 3"):
        fgs_format.load_fgs_model(out)
    out = fgs_format.save_fgs_model(tmp_path / "s", codes={"w": TensorCode((64, 128), [scalar])}, **kw)
    manifest, codes, _ = fgs_format.load_fgs_model(out)
    assert manifest["format_version"] == fgs_format.FORMAT_VERSION and codes["w"].levels[0].trellis == 0
