"""Native CPU kernels (mmt_mlx/native.py, kernels/cpu/) against the MLX-ops path and a float64 oracle."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mmt_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)
from mmt_mlx import native
from mmt_mlx.fgs.codes import QuantCode, TensorCode
from mmt_mlx.fgs.encoders.quant import SUPPORTED_BITS, SUPPORTED_GROUPS, pack_bits
from mmt_mlx.fgs.runtime import ops
from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear, GaussianLevel

needs_native = pytest.mark.skipif(
    native.mode() in ("0", "off", "false", "reference"), reason="MMT_NATIVE disables the native kernels"
)


def _code(rng: np.random.Generator, rows: int, cols: int, bits: int, group: int) -> QuantCode:
    q = rng.integers(0, 2**bits, size=(rows, cols))
    ng = cols // group
    scales = rng.uniform(0.01, 0.1, size=(rows, ng)).astype(np.float16)
    biases = rng.normal(scale=0.1, size=(rows, ng)).astype(np.float16)
    return QuantCode(rows, cols, bits, group, pack_bits(q, bits), scales, biases)


def _arrays(c: QuantCode) -> tuple[mx.array, mx.array, mx.array]:
    return mx.array(c.wq), mx.array(c.scales.astype(np.float32)), mx.array(c.biases.astype(np.float32))


def _dense(c: QuantCode) -> np.ndarray:
    by = c.wq.astype("<u4").view(np.uint8).reshape(c.rows, -1)
    bitstream = np.unpackbits(by, axis=1, bitorder="little")[:, : c.cols * c.bits]
    q = (bitstream.reshape(c.rows, c.cols, c.bits) * (1 << np.arange(c.bits))).sum(-1)
    g = np.arange(c.cols) // c.group_size
    return c.scales.astype(np.float64)[:, g] * q + c.biases.astype(np.float64)[:, g]


def _int_bound(c: QuantCode, x: np.ndarray) -> np.ndarray:
    """Error bound of the integer path (4/8-bit codes on AVX2): x is rounded per group to int16 steps of
    max|x_g| / 32767, so |dy| <= sum_j |s q_j| * step_g / 2 (the bias term uses exact sums of x)."""
    g = np.arange(c.cols) // c.group_size
    sq = np.abs(_dense(c) - c.biases.astype(np.float64)[:, g])  # |scale * q|
    xg = np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, c.group_size).max(-1)  # (tokens, groups)
    step = xg[:, g] / 32767.0
    return (step / 2) @ sq.T


def _run_fresh(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """python -c code in a fresh process from the repository root (settings the extension reads once), env added."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env}, cwd=root,
                          capture_output=True, text=True)  # fmt: skip


@needs_native
def test_extension_loads_for_this_mlx():
    assert native.available(), native.describe()
    info = native.describe()
    assert info["built_for_mlx"] == mx.__version__
    assert info["isa"] in ("avx2+fma+avx512vnni", "avx2+fma", "scalar")


@needs_native
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group", SUPPORTED_GROUPS)
def test_matches_reference_on_awkward_shapes(bits: int, group: int):
    rng = np.random.default_rng(bits * 1000 + group)
    for rows, ngroups, tokens in [(1, 1, 1), (7, 3, 2), (33, 2, 3), (130, 5, 70)]:
        cols = ngroups * group
        c = _code(rng, rows, cols, bits, group)
        wq, s, b = _arrays(c)
        x = rng.normal(size=(tokens, cols)).astype(np.float32)
        want = x.astype(np.float64) @ _dense(c).T
        ref = np.array(ops.quant_matmul(mx.array(x), wq, s, b, group, bits))
        outs = []
        for threads in (1, 2):
            native.set_threads(threads)
            outs.append(np.array(native.quant_matmul(mx.array(x), wq, s, b, group, bits)))
        native.set_threads(0)
        scale = np.abs(want).max() + 1e-6
        tol = 2e-5 * scale + _int_bound(c, x)  # float rounding + the integer path's rounding of x
        assert (np.abs(outs[0] - want) <= tol).all(), (rows, cols, tokens)
        assert (np.abs(outs[0] - ref) <= tol).all(), (rows, cols, tokens)
        np.testing.assert_array_equal(outs[0], outs[1])  # thread count does not change a bit


@needs_native
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_f16_scales_are_read_as_stored(bits: int):
    """Scales and biases kept f16 (what the FGS layers pass on the CPU) give the f32 result, subnormals too."""
    rng = np.random.default_rng(bits)
    c = _code(rng, 37, 192, bits, 64)
    c.scales[0, 0], c.biases[1, 1] = np.float16(3e-6), np.float16(-5e-7)  # f16 subnormals
    wq, s16, b16 = mx.array(c.wq), mx.array(c.scales), mx.array(c.biases)
    for tokens in (1, 3, 9):
        x = rng.normal(size=(tokens, 192)).astype(np.float32)
        want = x.astype(np.float64) @ _dense(c).T
        got = np.array(native.quant_matmul(mx.array(x), wq, s16, b16, 64, bits))
        assert (np.abs(got - want) <= 2e-5 * np.abs(want).max() + _int_bound(c, x)).all(), tokens


@needs_native
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group", SUPPORTED_GROUPS)
def test_dequantize_equals_mlx_dequantize(bits: int, group: int):
    """The long-prompt tile decoder: bit-identical to MLX's dequantize (f32 scales) and to the f16 scales
    read as stored, on awkward row counts, a row slice of a larger matrix, both thread counts."""
    rng = np.random.default_rng(bits * 7 + group)
    for rows, ngroups in [(1, 1), (5, 3), (37, 2)]:
        c = _code(rng, rows, ngroups * group, bits, group)
        wq, s, b = _arrays(c)
        want = np.array(mx.dequantize(wq, s, b, group_size=group, bits=bits))
        np.testing.assert_allclose(want, _dense(c), rtol=1e-6, atol=1e-7)
        for threads in (1, 2):
            native.set_threads(threads)
            np.testing.assert_array_equal(np.array(native.dequantize(wq, s, b, group, bits)), want)
            s16, b16 = mx.array(c.scales), mx.array(c.biases)
            np.testing.assert_array_equal(np.array(native.dequantize(wq, s16, b16, group, bits)), want)
            if rows > 2:
                got = np.array(native.dequantize(wq[1:-1], s16[1:-1], b16[1:-1], group, bits))
                np.testing.assert_array_equal(got, want[1:-1])
        native.set_threads(0)
    with pytest.raises(ValueError, match="shapes do not match"):
        native.dequantize(wq, s[:, :1] if s.shape[1] > 1 else s[:0], b, group, bits)


@needs_native
def test_long_prompt_takes_the_gemm_and_matches_ops(monkeypatch):
    """From gemm_min_tokens() tokens the native product is one GEMM (integer on AVX2 CPUs, else W decoded in row
    blocks into the f32 GEMM; f16 scales as stored, no f32 copy): the same as the MLX-ops path and float64 to
    rounding."""
    rng = np.random.default_rng(11)
    n = native.gemm_min_tokens()
    for rows, cols, bits, group, tokens in [
        (70, 192, 6, 64, n),
        (70, 192, 3, 32, n + 9),
        (3300, 640, 5, 32, n),
    ]:
        code = TensorCode((rows, cols), [_code(rng, rows, cols, bits, group)])
        lin = FGSLinear(code, use_kernel=False)
        x = mx.array(rng.normal(size=(1, tokens, cols)).astype(np.float32))
        y = np.array(lin(x))
        assert lin.levels[0]._ops_copy.pair is None
        want = np.array(x).astype(np.float64) @ _dense(code.levels[0]).T
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        with monkeypatch.context() as m:
            m.setenv("MMT_NATIVE", "0")
            np.testing.assert_allclose(y, np.array(lin(x)), rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_native
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_prompt_gemm_rows_do_not_depend_on_their_neighbours(bits: int):
    """A prompt's product (the integer GEMM on AVX2 CPUs, tiles of 16 rows and 4 tokens): each token's outputs
    are the same bits wherever it sits in the prompt (tail tokens included), f16 scales are read as stored
    (subnormals too), a group of x that is all zeros gives its bias part only, and the result stays within the
    int16 rounding bound of float64."""
    rng = np.random.default_rng(40 + bits)
    n = native.gemm_min_tokens()
    rows, cols, group = 37, 3 * 64, 64
    c = _code(rng, rows, cols, bits, group)
    c.scales[0, 0], c.biases[1, 1] = np.float16(3e-6), np.float16(-5e-7)
    wq, s16, b16 = mx.array(c.wq), mx.array(c.scales), mx.array(c.biases)
    x = rng.normal(size=(n + 6, cols)).astype(np.float32)
    x[2, :group] = 0.0
    x[5] *= 1e4
    y = np.array(native.quant_matmul(mx.array(x), wq, s16, b16, group, bits))
    want = x.astype(np.float64) @ _dense(c).T
    assert (np.abs(y - want) <= 2e-5 * np.abs(want).max(axis=1, keepdims=True) + _int_bound(c, x)).all()
    perm = rng.permutation(len(x))
    np.testing.assert_array_equal(
        np.array(native.quant_matmul(mx.array(x[perm]), wq, s16, b16, group, bits)), y[perm]
    )


def _codebook_bound(code, x: np.ndarray) -> np.ndarray:
    """Error bound of the native codebook product: each level rounded to a step of max|level| / 2047, x to int16
    per 32 columns (step max|x_block| / 32767), plus float rounding."""
    from mmt_mlx.fgs.encoders.gauss_codes import decode_rotated

    w = decode_rotated(code).astype(np.float64)  # the rotated rows, scale * level
    g = np.arange(code.cols) // code.group_size
    s = np.abs(code.scales.astype(np.float64))[:, g]
    level_step = np.abs(code.codebook).max() / 2047
    xa = np.abs(x.astype(np.float64))
    xstep = xa.reshape(len(x), -1, 32).max(-1).repeat(32, axis=1) / 32767
    return (xa * level_step / 2) @ s.T + (xstep / 2) @ np.abs(w).T + 1e-5 * xa @ np.abs(w).T


@needs_native
@pytest.mark.parametrize(
    "bits,trellis",
    [(b, t) for b in (2, 3, 4, 5, 6) for t in (False, True)] + [(8, False)],  # 8: scalar only
)
def test_codebook_product_against_float64_and_alone_vs_batched(bits: int, trellis: bool, monkeypatch):
    """The rotated Gaussian codes' product on the integer GEMM (any token count), scalar and trellis codes:
    within its rounding bound of float64 and of the MLX path, the same bits on 1 and 2 threads, and a token's
    outputs the same bits alone as inside a batch of 40 (what a continuous batch needs)."""
    from mmt_mlx.fgs.encoders.gauss_codes import decode_rotated, encode_rotq

    if not native.codebook_enabled(64):
        pytest.skip("this CPU has no integer kernels: the MLX path serves the codebook codes")
    rng = np.random.default_rng(bits)
    shapes = [(37, 192, 64), (20, 256, 128), (33, 96, 32)] + ([(1, 64, 32), (530, 64, 64)] if trellis else [])
    for rows, cols, group in shapes:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        code = encode_rotq(w, bits, group, seed=3, trellis=trellis)
        wr = decode_rotated(code).astype(np.float64)
        args = (
            mx.array(code.wq),
            mx.array(code.scales.astype(np.float32)),
            mx.array(code.codebook),
            group,
            bits,
        )
        x = rng.standard_normal((40, cols)).astype(np.float32)
        x[3, :32] = 0.0
        outs = []
        for threads in (1, 2):
            native.set_threads(threads)
            outs.append(np.array(native.codebook_matmul(mx.array(x), *args)))
        native.set_threads(0)
        np.testing.assert_array_equal(outs[0], outs[1])
        y = outs[0]
        bound = _codebook_bound(code, x)
        assert (np.abs(y - x.astype(np.float64) @ wr.T) <= bound).all(), (rows, cols, group)
        for t in (0, 3, 39):
            np.testing.assert_array_equal(
                np.array(native.codebook_matmul(mx.array(x[t : t + 1]), *args))[0], y[t]
            )
        f16 = (
            mx.array(code.wq),
            mx.array(code.scales),
            mx.array(code.codebook),
            group,
            bits,
        )  # scales as stored
        np.testing.assert_array_equal(np.array(native.codebook_matmul(mx.array(x), *f16)), y)
    with pytest.raises(ValueError, match="2\\^bits levels"):
        native.codebook_matmul(mx.array(x), args[0], args[1], args[2][:-1], group, bits)


@needs_native
def test_rotq_layer_runs_native_and_matches_the_mlx_path(monkeypatch):
    """An FGS linear layer of rotq codes runs the native nodes (the rotation, the product) and agrees with the
    MLX reference path within the integer rounding."""
    from mmt_mlx.fgs.encoders.gauss_codes import encode_rotq

    if not native.codebook_enabled(64):
        pytest.skip("this CPU has no integer kernels: the MLX path serves the codebook codes")
    rng = np.random.default_rng(0)
    code = encode_rotq(rng.standard_normal((70, 128)).astype(np.float32), 4, 64, seed=5)
    lin = FGSLinear(TensorCode((70, 128), [code]))
    x = mx.array(rng.standard_normal((1, 9, 128)).astype(np.float32))
    y = lin(x)
    assert "CodebookMatmul" in _node_names(y) and "FftRotate" in _node_names(y)
    with monkeypatch.context() as m:
        m.setenv("MMT_NATIVE", "0")
        ref = lin(x)
        assert "CodebookMatmul" not in _node_names(ref) and "FftRotate" not in _node_names(ref)
    np.testing.assert_allclose(np.array(y), np.array(ref), rtol=2e-3, atol=2e-3 * np.abs(np.array(ref)).max())


@needs_native
@pytest.mark.parametrize("n", [1, 2, 7, 64, 576, 577, 640, 1536])
@pytest.mark.parametrize("threads", [1, 2])
def test_fft_rotation_against_float64_and_alone_vs_batched(n: int, threads: int):
    """The native rotation (and its inverse) of every row equals the float64 rotation of rotation.py to float
    rounding at any width, even or odd; a row rotated alone gets the same bits as in a batch, on 1 or 2 threads."""
    from mmt_mlx.fgs.encoders.rotation import rotate, rotation_params, unrotate
    from mmt_mlx.fgs.runtime.rotq_layer import Rotation

    r = Rotation(n, 11)
    signs, _ = rotation_params(n, 11)
    assert np.array_equal(np.array(r.signs), signs.astype(np.float32))
    x = np.random.default_rng(n).standard_normal((37, n)).astype(np.float32)
    native.set_threads(threads)
    try:
        y = np.array(native.fft_rotate(mx.array(x), r.signs, r.phase_re_im))
        back = np.array(native.fft_rotate(mx.array(x), r.signs, r.phase_re_im, inverse=True))
        alone = np.array(native.fft_rotate(mx.array(x[5:6]), r.signs, r.phase_re_im))
    finally:
        native.set_threads(0)
    scale = np.abs(x).max()
    np.testing.assert_allclose(
        y, rotate(x.astype(np.float64), 11), atol=2e-6 * scale * np.sqrt(np.log2(n + 1))
    )
    np.testing.assert_allclose(
        back, unrotate(x.astype(np.float64), 11), atol=2e-6 * scale * np.sqrt(np.log2(n + 1))
    )
    np.testing.assert_array_equal(alone[0], y[5])
    with pytest.raises(ValueError, match="signs must be"):
        native.fft_rotate(mx.array(x), r.signs[:-1], r.phase_re_im)


@needs_native
def test_weights_move_to_huge_pages_unchanged(monkeypatch):
    """Large weight buffers are collapsed onto 2 MB pages at load (Linux THP), values untouched; small ones and
    MMT_HUGEPAGES=0 are left alone."""
    import mlx.nn as nn

    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not sys.platform.startswith("linux") or not os.path.exists(thp) or "[never]" in open(thp).read():
        pytest.skip("no transparent huge pages on this system")
    m = nn.Module()
    m.big = mx.array(np.random.default_rng(0).standard_normal((1 << 21) + 5).astype(np.float32))  # ~8 MB
    m.small = mx.array(np.ones(1000, np.float32))
    mx.eval(m.parameters())
    before = np.array(m.big)
    with monkeypatch.context() as ctx:
        ctx.setenv("MMT_HUGEPAGES", "0")
        assert native.advise_hugepages(m) == 0
    moved = native.advise_hugepages(m)
    assert moved % (1 << 21) == 0 and (1 << 21) * 2 <= moved <= m.big.nbytes
    np.testing.assert_array_equal(np.array(m.big), before)


def _node_names(out: mx.array) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, out)
        return open(f.name).read()


@needs_native
def test_leading_dims_dtype_and_graph_transforms():
    rng = np.random.default_rng(5)
    c = _code(rng, 40, 128, 4, 64)
    wq, s, b = _arrays(c)
    x = mx.array(rng.normal(size=(2, 3, 128)).astype(np.float32))
    want = np.array(ops.quant_matmul(x, wq, s, b, 64, 4))
    atol = 1e-5 + _int_bound(c, np.array(x).reshape(-1, 128)).max()  # 4-bit: the integer path
    y = native.quant_matmul(x, wq, s, b, 64, 4)
    assert y.shape == (2, 3, 40)
    np.testing.assert_allclose(np.array(y), want, rtol=1e-4, atol=atol)
    compiled = mx.compile(lambda t: native.quant_matmul(t, wq, s, b, 64, 4) * 2.0)
    np.testing.assert_allclose(np.array(compiled(x)), 2 * want, rtol=1e-4, atol=2 * atol)
    xt = mx.swapaxes(mx.array(rng.normal(size=(128, 5)).astype(np.float32)), 0, 1)  # not row-contiguous
    np.testing.assert_allclose(
        np.array(native.quant_matmul(xt, wq, s, b, 64, 4)), np.array(ops.quant_matmul(xt, wq, s, b, 64, 4)),
        rtol=1e-4, atol=1e-5 + _int_bound(c, np.array(xt)).max(),
    )  # fmt: skip
    assert native.quant_matmul(x.astype(mx.float16), wq, s, b, 64, 4).dtype == mx.float16
    with pytest.raises(ValueError, match="shapes do not match"):
        native.quant_matmul(x[..., :64], wq, s, b, 64, 4)


@needs_native
def test_scalar_fallback_path_agrees():
    """The portable code (what CPUs without AVX2 run) against the float64 oracle, in a fresh process."""
    code = (
        "import numpy as np, mlx.core as mx, mmt_mlx\n"
        "from mmt_mlx import native\n"
        "from tests.test_native import _code, _arrays, _dense\n"
        "assert native.describe()['isa'] == 'scalar'\n"
        "rng = np.random.default_rng(0)\n"
        "for bits in (2, 3, 4, 5, 6, 8):\n"
        "    c = _code(rng, 9, 96, bits, 32); wq, s, b = _arrays(c)\n"
        "    for t in (1, 5):\n"
        "        x = rng.normal(size=(t, 96)).astype(np.float32)\n"
        "        want = x.astype(np.float64) @ _dense(c).T\n"
        "        got = np.array(native.quant_matmul(mx.array(x), wq, s, b, 32, bits))\n"
        "        assert np.abs(got - want).max() < 2e-5 * np.abs(want).max(), bits\n"
        "    deq = np.array(native.dequantize(wq, s, b, 32, bits))\n"
        "    assert np.array_equal(deq, np.array(mx.dequantize(wq, s, b, group_size=32, bits=bits))), bits\n"
        "print('ok')\n"
    )
    out = _run_fresh(code, {"MMT_NATIVE_ISA": "scalar"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@needs_native
def test_avx2_integer_path_equals_the_vnni_one(tmp_path):
    """MMT_NATIVE_ISA=avx2 (vpmaddwd + vpaddd, what AVX2 CPUs without VNNI run) in a fresh process: one token, a
    few tokens and a prompt through the integer GEMM, within the int16 bound of float64 and, the int32 sums being
    exact either way, the same bits as this process's kernels."""
    if native.describe()["isa"] == "scalar":
        pytest.skip("this CPU has no AVX2: only the portable path runs here")
    rng = np.random.default_rng(8)
    cases = {}
    for bits in SUPPORTED_BITS:
        c = _code(rng, 45, 192, bits, 64)
        for t in (1, 5, native.gemm_min_tokens() + 3):
            x = rng.normal(size=(t, 192)).astype(np.float32)
            y = np.array(native.quant_matmul(mx.array(x), *_arrays(c), 64, bits))
            bound = 2e-5 * np.abs(y).max() + _int_bound(c, x)
            assert (np.abs(y - x.astype(np.float64) @ _dense(c).T) <= bound).all(), (bits, t)
            cases[f"{bits}_{t}"] = (c, x, y)
    np.savez(tmp_path / "cases.npz", **{k: v[2] for k, v in cases.items()})
    code = (
        "import sys, numpy as np, mlx.core as mx, mmt_mlx\n"
        "from mmt_mlx import native\n"
        "from tests.test_native import _code, _arrays, _dense\n"
        "from mmt_mlx.fgs.encoders.quant import SUPPORTED_BITS\n"
        "assert native.describe()['isa'] == 'avx2+fma', native.describe()\n"
        "want = np.load(sys.argv[1] + '/cases.npz')\n"
        "rng = np.random.default_rng(8)\n"
        "for bits in SUPPORTED_BITS:\n"
        "    c = _code(rng, 45, 192, bits, 64)\n"
        "    for t in (1, 5, native.gemm_min_tokens() + 3):\n"
        "        x = rng.normal(size=(t, 192)).astype(np.float32)\n"
        "        got = np.array(native.quant_matmul(mx.array(x), *_arrays(c), 64, bits))\n"
        "        assert np.array_equal(got, want[f'{bits}_{t}']), (bits, t)\n"
        "print('ok')\n"
    )
    out = _run_fresh(code, {"MMT_NATIVE_ISA": "avx2"}, str(tmp_path))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@needs_native
def test_split_one_token_product_is_bit_identical(tmp_path):
    """A one-token product split over two threads (what a vocabulary head gets) equals the unsplit one bit for
    bit (MMT_SPLIT_MATVEC is read once per process, so the split runs in a fresh one)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 256)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    want = {}
    for bits in SUPPORTED_BITS:
        c = _code(np.random.default_rng(bits), 301, 256, bits, 64)
        want[bits] = np.array(native.quant_matmul(mx.array(x), *_arrays(c), 64, bits))
    code = (
        "import sys, numpy as np, mlx.core as mx, mmt_mlx\n"
        "from mmt_mlx import native\n"
        "from tests.test_native import _code, _arrays\n"
        "from mmt_mlx.fgs.encoders.quant import SUPPORTED_BITS\n"
        "x = mx.array(np.load(sys.argv[1] + '/x.npy'))\n"
        "for bits in SUPPORTED_BITS:\n"
        "    c = _code(np.random.default_rng(bits), 301, 256, bits, 64)\n"
        "    np.save(f'{sys.argv[1]}/y{bits}.npy', np.array(native.quant_matmul(x, *_arrays(c), 64, bits)))\n"
    )
    out = _run_fresh(code, {"MMT_SPLIT_MATVEC": "1000", "MMT_THREADS": "2"}, str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    for bits in SUPPORTED_BITS:
        np.testing.assert_array_equal(np.load(tmp_path / f"y{bits}.npy"), want[bits])


@needs_native
def test_fgs_layers_use_native_and_match_ops(monkeypatch):
    rng = np.random.default_rng(7)
    code = TensorCode((50, 96), [_code(rng, 50, 96, 3, 32)])
    lin, emb = FGSLinear(code, use_kernel=False), FGSEmbedding(code, use_kernel=False)
    x64 = rng.normal(size=(1, 4, 96)).astype(np.float32)
    x = mx.array(x64)
    assert native.enabled()
    ids = mx.array([[0, 49, 7], [7, 3, 0]])
    y_native, head_native, rows_native = np.array(lin(x)), np.array(emb.as_linear(x)), np.array(emb(ids))
    monkeypatch.setenv("MMT_NATIVE", "0")
    assert not native.enabled()
    atol = 1e-5 + _int_bound(code.levels[0], x64.reshape(4, 96)).max()  # x rounded to int16 per group
    np.testing.assert_allclose(y_native, np.array(lin(x)), rtol=1e-4, atol=atol)
    np.testing.assert_allclose(head_native, np.array(emb.as_linear(x)), rtol=1e-4, atol=atol)
    # embedding rows: one native dequantize node against MLX's (an FMA against a multiply and an add)
    assert rows_native.shape == (2, 3, 96) and rows_native.dtype == np.float32
    np.testing.assert_allclose(rows_native, np.array(emb(ids)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rows_native, _dense(code.levels[0])[np.array(ids)], rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_integer_path_is_exact_on_its_grid(bits: int):
    """x already on the int16 grid (each group's max exactly 1): the integer kernels' only rounding is gone, so
    they must equal the float64 product (catches any mismatch between the code and x layouts)."""
    rng = np.random.default_rng(20 + bits)
    for group, cols in [(32, 128), (64, 128), (128, 256)]:
        c = _code(rng, 9, cols, bits, group)
        for tokens in (1, 3, 8, 11):
            xi = rng.integers(-32767, 32768, size=(tokens, cols))
            xi[:, ::group] = 32767
            x = (xi / 32767.0).astype(np.float32)
            want = x.astype(np.float64) @ _dense(c).T
            got = np.array(native.quant_matmul(mx.array(x), mx.array(c.wq), mx.array(c.scales), mx.array(c.biases),
                                               group, bits))  # fmt: skip
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (group, tokens)


@needs_native
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activation_matches_float64(gelu: bool):
    """SiLU / GELU-tanh gating: tail lanes, extreme inputs, a prompt-sized input shared over the pool (bits
    independent of the thread count), and a row alone equal to the same row inside the prompt."""
    rng = np.random.default_rng(31 + gelu)
    for shape in [(1, 7), (3, 2048), (5, 16411)]:
        g = rng.normal(scale=3.0, size=shape).astype(np.float32)
        g.flat[:7] = [0.0, -0.0, 90.0, -90.0, 1e-30, -200.0, 200.0]
        u = rng.normal(size=shape).astype(np.float32)
        g64 = g.astype(np.float64)
        if gelu:
            act = 0.5 * g64 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g64 + 0.044715 * g64**3)))
        else:
            act = g64 / (1.0 + np.exp(-g64))
        want = act * u
        outs = []
        for threads in (1, 2):
            native.set_threads(threads)
            outs.append(np.array(native.gated_activation(mx.array(g), mx.array(u), gelu)))
        native.set_threads(0)
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_allclose(outs[0], want, rtol=1e-5, atol=1e-6)
        alone = np.array(native.gated_activation(mx.array(g[-1:]), mx.array(u[-1:]), gelu))
        np.testing.assert_array_equal(alone, outs[0][-1:])


def test_absent_extension_falls_back_to_mlx_ops(monkeypatch, capsys):
    rng = np.random.default_rng(8)
    code = TensorCode((20, 64), [_code(rng, 20, 64, 4, 32)])
    x = mx.array(rng.normal(size=(3, 64)).astype(np.float32))
    want = x.__array__().astype(np.float64) @ _dense(code.levels[0]).T
    monkeypatch.delenv("MMT_NATIVE", raising=False)
    monkeypatch.setitem(sys.modules, "mmt_mlx._native", None)  # import now fails, as if never built
    native.reset()
    try:
        assert not native.available()
        lin = FGSLinear(code, use_kernel=False)
        np.testing.assert_allclose(np.array(lin(x)), want, rtol=1e-4, atol=1e-5)
        lin(x)
        err = capsys.readouterr().err
        assert err.count("native CPU kernels unavailable") == 1 and err.count("\n") == 1
        assert native.describe()["path"] == "MLX ops (reference)"
        monkeypatch.setenv("MMT_NATIVE", "1")
        with pytest.raises(RuntimeError, match="unavailable"):
            lin(x)
    finally:
        monkeypatch.undo()
        native.reset()


def test_extension_built_for_another_mlx_is_not_loaded(monkeypatch, tmp_path):
    stale = tmp_path / "version.txt"
    stale.write_text("0.0.1\n")
    monkeypatch.setattr(native, "VERSION_FILE", stale)
    native.reset()
    try:
        assert not native.available()
        assert "built for mlx 0.0.1" in native.describe()["reason"]
    finally:
        monkeypatch.undo()
        native.reset()


@needs_native
def test_rms_norm_and_rope_match_mlx_fast():
    """The norm and RoPE nodes against mx.fast (whose CPU form is a graph of small ops) and float64."""
    rng = np.random.default_rng(11)
    for shape in [(1, 1, 5), (2, 3, 577), (4, 64)]:
        x = mx.array(rng.normal(size=shape).astype(np.float32))
        w = mx.array(rng.normal(size=shape[-1]).astype(np.float32))
        np.testing.assert_allclose(
            np.array(native.rms_norm(x, w, 1e-6)),
            np.array(mx.fast.rms_norm(x, w, 1e-6)),
            rtol=1e-5,
            atol=1e-6,
        )
    x64 = rng.normal(size=(3, 5, 7, 62))  # (B, T, H, D): read transposed, as the models pass q and k
    x = mx.array(x64.astype(np.float32)).transpose(0, 2, 1, 3)
    for off in ([0], [0, 900, 4000], [17]):
        o = mx.array(np.array(off if len(off) > 1 else off[0], dtype=np.int32))
        got = np.array(native.rope(x, o, 62, 10000.0, 1.0))
        ref = np.array(mx.fast.rope(x, 62, traditional=False, base=10000.0, scale=1.0, offset=o))
        pos = np.array(off)[:, None] + np.arange(5)[None, :]  # (B or 1, T)
        th = pos[:, None, :, None] * 10000.0 ** (-np.arange(31) / 31)  # (B, 1, T, half)
        xt = x64.transpose(0, 2, 1, 3)
        want = np.concatenate(
            [
                xt[..., :31] * np.cos(th) - xt[..., 31:] * np.sin(th),
                xt[..., :31] * np.sin(th) + xt[..., 31:] * np.cos(th),
            ],
            axis=-1,
        )
        tol = 1e-5 + 2e-7 * pos.max()  # f32 angles: the error grows with the position, as in MLX's own
        assert np.abs(got - want).max() < tol and np.abs(ref - want).max() < 2 * tol, off


@needs_native
def test_models_native_nodes_match_mlx_ops(monkeypatch):
    """Whole tiny models: logits with the native norm/RoPE/product nodes == MLX ops (MMT_NATIVE=0)."""
    from mmt_mlx.testing import tiny_model

    for arch in ("llama", "gemma3"):
        lm = tiny_model(arch)
        tokens = mx.array([list(range(3, 40))])
        monkeypatch.delenv("MMT_NATIVE", raising=False)
        got = np.array(lm.model(tokens))
        monkeypatch.setenv("MMT_NATIVE", "0")
        want = np.array(lm.model(tokens))
        monkeypatch.delenv("MMT_NATIVE")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_native
def test_decode_attention_matches_mlx_sdpa():
    """Grouped heads, strided q (transposed) and k/v (cache slices), no mask, a (B,1,1,Lk) and an (Lq, Lk) mask;
    decode steps and prompt-sized query counts (rows shared over the pool: the same bits on one thread), head
    widths with and without a whole 64-column block."""
    rng = np.random.default_rng(12)

    def ref(q, k, v, mask):
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        b, h, n, d = o.shape
        return np.array(o.transpose(0, 2, 1, 3).reshape(b, n, h * d))

    cases = [(1, 9, 3, 1, 37, 64), (3, 4, 2, 1, 50, 62), (2, 4, 4, 3, 1, 16), (1, 4, 1, 70, 70, 256),
             (2, 9, 3, 21, 33, 80), (2, 3, 1, 300, 310, 64)]  # fmt: skip
    for b, hq, hkv, lq, lk, d in cases:
        q = mx.array(rng.normal(size=(b, lq, hq, d)).astype(np.float32)).transpose(0, 2, 1, 3)
        k = mx.array(rng.normal(size=(b, hkv, lk + 9, d)).astype(np.float32))[..., :lk, :]
        v = mx.array(rng.normal(size=(b, hkv, lk + 9, d)).astype(np.float32))[..., :lk, :]
        m4, m2 = rng.random(size=(b, 1, 1, lk)) > 0.3, rng.random(size=(lq, lk)) > 0.3
        m4[..., -1] = m2[..., -1] = (
            True  # every query sees a key (the model's masks always show the diagonal)
        )
        masks = [None, mx.array(m4), mx.array(m2)]
        for mask in masks:
            got = np.array(native.decode_attention(q, k, v, 0.125, mask))
            # 256-wide heads sum longer: their rounding reaches a few 1e-6 of outputs of order 1
            np.testing.assert_allclose(got, ref(q, k, v, mask), rtol=1e-5, atol=1e-6 if d <= 64 else 5e-6)
            if lq > 8:
                try:
                    native.set_threads(1)
                    np.testing.assert_array_equal(
                        np.array(native.decode_attention(q, k, v, 0.125, mask)), got
                    )
                finally:
                    native.set_threads(0)


@needs_native
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_one_token_equals_its_row_of_a_batch(bits: int):
    """Bit for bit: a token alone and the same token in a 2-8 token batch (a continuous batch's step) get the
    same product, so a request's greedy tokens do not depend on who it is batched with."""
    rng = np.random.default_rng(40 + bits)
    c = _code(rng, 70, 192, bits, 64)
    wq, s16, b16 = mx.array(c.wq), mx.array(c.scales), mx.array(c.biases)
    x = rng.normal(size=(8, 192)).astype(np.float32)
    for n in (2, 5, 8):
        batch = np.array(native.quant_matmul(mx.array(x[:n]), wq, s16, b16, 64, bits))
        for i in range(n):
            alone = np.array(native.quant_matmul(mx.array(x[i : i + 1]), wq, s16, b16, 64, bits))
            np.testing.assert_array_equal(alone[0], batch[i])


@needs_native
@pytest.mark.parametrize(
    ("rows", "cols", "k", "grid", "perm"),
    [
        (37, 83, 5, [0.3, 1.0, 2.5, 7.0, 40.0], True),  # widest reach clipped at cols - 1
        (64, 640, 10, [0.5, 0.82, 1.35, 2.21, 3.62, 5.94, 9.75, 16.0], True),  # Gemma's grid and width
        (5, 9, 1, [0.7], False),
    ],
)
def test_gaussian_level_matches_the_reference_and_the_oracle(rows, cols, k, grid, perm):
    """The native Gaussian product (a direct blur per width, then K taps per row) against the MLX reference
    (conv1d/FFT blurs) and the float64 dense oracle, for one and many tokens, bit for bit across thread
    counts and batch positions."""
    # imported here: subprocess tests import this module without tests/ on the path
    from metal_harness import oracle as O

    rng = np.random.default_rng(rows + cols)
    code = O.random_gaussian(rng, rows, cols, k, grid=grid, perm=perm)
    lv = GaussianLevel(code, use_kernel=False)
    x = rng.normal(size=(6, cols)).astype(np.float32)
    want = x.astype(np.float64) @ O.decode_gaussian(code).T
    got = np.array(native.gaussian_matmul(mx.array(x), *lv.native_operands()))
    scale = np.abs(x).astype(np.float64) @ np.abs(O.decode_gaussian(code)).T
    assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-6)
    with native.suspended():
        ref = np.array(lv(mx.array(x)))
    assert np.all(np.abs(got - ref) <= 1e-5 * scale + 1e-6)
    assert np.array_equal(np.array(lv(mx.array(x))), got)  # the level takes the native path when it is on
    for i in range(6):
        alone = np.array(native.gaussian_matmul(mx.array(x[i : i + 1]), *lv.native_operands()))
        np.testing.assert_array_equal(alone[0], got[i])
    try:
        native.set_threads(1)
        np.testing.assert_array_equal(
            np.array(native.gaussian_matmul(mx.array(x), *lv.native_operands())), got
        )
    finally:
        native.set_threads(0)


@needs_native
def test_gaussian_level_rejects_bad_operands():
    from metal_harness import oracle as O

    rng = np.random.default_rng(3)
    amp, index, perm, taps, reach = GaussianLevel(O.random_gaussian(rng, 8, 16, 2), False).native_operands()
    x = mx.zeros((1, 16))
    with pytest.raises(ValueError, match="permutation"):
        native.gaussian_matmul(mx.zeros((1, 15)), amp, index, perm, taps, reach)
    with pytest.raises(ValueError, match="amplitudes"):
        native.gaussian_matmul(x, amp, index.astype(mx.int16), perm, taps, reach)
    with pytest.raises(ValueError, match="taps"):
        native.gaussian_matmul(x, amp, index, perm, taps[:, :-1], reach)
    bad = O.random_gaussian(rng, 8, 16, 2)
    bad.mu[0, 0] = 16
    with pytest.raises(ValueError, match="out of range"):
        GaussianLevel(bad, False).native_operands()


@needs_native
def test_argmax_is_mlx_argmax():
    """The sampler's native argmax gives mx.argmax's index at every length around the 8-float vector width, with
    ties (the first wins), infinities and NaNs (the first NaN wins, as MLX and numpy), for each row of a batch."""
    rng = np.random.default_rng(11)
    for n in (1, 2, 7, 8, 9, 16, 17, 31, 1000, 49_152):
        for trial in range(12):
            x = rng.normal(size=(3, n)).astype(np.float32)
            if trial % 3 == 0:
                x[:, rng.integers(0, n, size=max(1, n // 10))] = 4.0  # ties at the maximum
            if trial % 4 == 1:
                x[0, rng.integers(0, n)] = np.nan
            if trial == 5:
                x[1, 0] = np.nan
            if trial == 6:
                x[2] = -np.inf
            if trial == 7:
                x[2, -1] = np.inf
            got = np.array(native.argmax(mx.array(x)))
            want = np.array(mx.argmax(mx.array(x), axis=-1))
            assert got.dtype == want.dtype and np.array_equal(got, want), (n, trial)
            np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert int(native.argmax(mx.array([2.0, 5.0, 5.0]))) == 1  # 1-D logits, as the sampler passes them
