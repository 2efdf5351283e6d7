"""Row bands (codes.row_bands): vocabulary rows split by token importance, each band a rotq level at its own width;
the codes, the file, the runtime on both paths, the planner's split and the calibration weights."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mmt_mlx.fgs import format as fgs_format
from mmt_mlx.fgs.codec import decode_tensor, tensor_nbytes
from mmt_mlx.fgs.codes import TensorCode, row_bands, row_mask
from mmt_mlx.fgs.encoders.gauss_codes import decode_rotq, encode_rotq
from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear
from mmt_mlx.rotq_calibrate import TokenImportance
from mmt_mlx.rotq_convert import band_errors, row_band_ids


def _banded(rows: int = 203, cols: int = 128, seed: int = 0) -> tuple[np.ndarray, TensorCode, list]:
    """A random W coded in three bands of unequal rows: trellis 5 bits, trellis 3 bits, scalar 2 bits."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    bands = row_band_ids(rng.random(rows), (0.1, 0.3, 0.6))
    levels = []
    for ids, (bits, trellis) in zip(bands, ((5, True), (3, True), (2, False))):
        code = encode_rotq(w[ids], bits, 64, 11, None, log_scales=True, trellis=trellis)
        code.row_mask, code.tensor_rows = row_mask(ids, rows), rows
        levels.append(code)
    return w, TensorCode((rows, cols), levels), bands


def test_bands_partition_the_rows_and_decode_in_place():
    w, tc, bands = _banded()
    assert [len(b) for b in bands] == [20, 61, 122] and all((np.diff(b) > 0).all() for b in bands)
    got = row_bands(tc.levels, 203)
    for a, b in zip(got, bands):
        np.testing.assert_array_equal(a, b)
    dense = decode_tensor(tc)
    for ids, lv in zip(bands, tc.levels):
        np.testing.assert_array_equal(dense[ids], decode_rotq(lv))
    # more bits where the band is coded finer: the 5-bit band's error is the smallest
    err = [float(np.square(w[i] - dense[i]).sum() / np.square(w[i]).sum()) for i in bands]
    assert err[0] < err[1] < err[2]
    # the masks are counted: 26 bytes each for 203 rows
    assert tensor_nbytes(tc) == sum(lv.wq.nbytes + lv.scales.nbytes + lv.row_scale.nbytes + lv.codebook.nbytes
                                    for lv in tc.levels) + 3 * 26  # fmt: skip
    errs = band_errors(w, tc, None)  # after each band: the rows not yet filled count as missing
    assert errs[0] > errs[1] > errs[2] and errs[2] == pytest.approx(
        float(np.square(w - dense).sum() / np.square(w).sum())
    )


def test_bands_that_do_not_partition_are_refused():
    _, tc, bands = _banded()
    lv = tc.levels[1]
    # band 1 trades its last row for band 0's first: one row twice, another in no band
    lv.row_mask = row_mask(np.concatenate([bands[1][:-1], bands[0][:1]]), 203)
    with pytest.raises(ValueError, match="partition"):
        row_bands(tc.levels, 203)
    whole = encode_rotq(np.zeros((203, 128), np.float32), 2, 64, 1)
    with pytest.raises(ValueError, match="mixed"):
        row_bands([tc.levels[0], whole], 203)


@pytest.fixture(params=["mlx", "native"])
def path(request, monkeypatch):
    monkeypatch.setenv("MMT_NATIVE", "0" if request.param == "mlx" else "auto")
    return request.param


@pytest.mark.parametrize("tokens", [1, 4])
def test_product_lookup_and_tied_head_match_numpy(tokens, path):
    _, tc, _ = _banded()
    dense = decode_tensor(tc)
    x = np.random.default_rng(1).standard_normal((1, tokens, 128)).astype(np.float32)
    tol = (1e-4 if path == "mlx" else 1e-3) * (np.abs(x) @ np.abs(dense).T) + 1e-5
    lin = FGSLinear(tc)
    assert (np.abs(np.asarray(lin(mx.array(x))) - x @ dense.T) <= tol).all()
    emb = FGSEmbedding(tc)
    ids = [0, 1, 2, 202, 17, 17, 41, 100]
    np.testing.assert_allclose(np.asarray(emb(mx.array([ids])))[0], dense[ids], rtol=1e-4, atol=1e-5)
    assert (np.abs(np.asarray(emb.as_linear(mx.array(x[0]))) - x[0] @ dense.T) <= tol[0]).all()


def test_file_round_trip_version_and_a_broken_partition(tmp_path):
    _, tc, _ = _banded()
    kw = dict(arch="llama", config={}, raw={}, tokenizer={}, tokenizer_files={}, report={})
    out = fgs_format.save_fgs_model(tmp_path / "b", codes={"w": tc}, **kw)
    manifest, codes, _ = fgs_format.load_fgs_model(out)
    assert manifest["format_version"] == fgs_format.ROW_BANDS_VERSION
    np.testing.assert_array_equal(decode_tensor(codes["w"]), decode_tensor(tc))
    manifest["tensors"]["w"]["levels"] = manifest["tensors"]["w"]["levels"][:2]  # a band missing
    (out / fgs_format.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(fgs_format.ModelFormatError, match="partition"):
        fgs_format.load_fgs_model(out)


def test_band_split_follows_the_weights():
    weight = np.array([0.1, 5.0, 0.0, 3.0, 0.2, 9.0, 0.0, 0.0, 1.0, 0.5])
    bands = row_band_ids(weight, (0.2, 0.3, 0.5))
    assert [b.tolist() for b in bands] == [[1, 5], [3, 8, 9], [0, 2, 4, 6, 7]]


def test_token_importance_weighs_what_the_model_predicts_and_reads():
    imp = TokenImportance()
    logits = mx.array(np.log(np.array([[0.7, 0.1, 0.1, 0.1, 1e-9]] * 4, np.float32)))
    imp([0, 1, 1, 1], logits)
    w = imp.weights()
    assert w.sum() == pytest.approx(1.0, abs=1e-6)
    # token 0: predicted 0.7 and read once in 4; token 1: predicted 0.1 and read 3 times; token 4: neither
    np.testing.assert_allclose(w, [0.5 * (0.7 + 0.25), 0.5 * (0.1 + 0.75), 0.05, 0.05, 0.0], atol=1e-6)
