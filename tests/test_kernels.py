"""FGS products: reference ops and GPU kernel text, against a float64 numpy oracle.

The Metal and the CUDA bodies both run on the CPU through tests/metal_harness (g++, one std::thread per thread
of a threadgroup); the CUDA bodies are also compiled with nvcc, wrapped as mx.fast.cuda_kernel wraps them.
"""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from metal_harness import harness
from metal_harness import oracle as O

import mmt_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)
from mmt_mlx.fgs.runtime import kernels as K
from mmt_mlx.fgs.runtime import ops

RTOL = 2e-5  # error / max |y|, f32 accumulation over a few hundred columns


def _close(got: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> None:
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    scale = max(1e-6, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err < rtol, f"relative error {err:.3g}"


# ---------------------------------------------------------------- reference ops


@pytest.mark.parametrize(
    "rows,cols,k,tokens,perm",
    [(37, 53, 5, (3,), True), (1, 7, 1, (1,), False), (64, 300, 9, (2, 5), True), (19, 1, 2, (4,), False)],
)
def test_gaussian_ops(rows, cols, k, tokens, perm):
    rng = np.random.default_rng(rows * 1000 + cols)
    c = O.random_gaussian(rng, rows, cols, k, perm=perm)
    x = rng.normal(size=tokens + (cols,)).astype(np.float32)
    y = ops.gaussian_matmul(
        mx.array(x),
        mx.array(c.amp),
        mx.array(c.mu),
        mx.array(c.sidx),
        c.sigma_grid,
        None if c.perm is None else mx.array(c.perm),
    )
    _close(np.array(y), x.astype(np.float64) @ O.decode_gaussian(c).T)


def test_gaussian_ops_token_chunks(monkeypatch):
    # force several gather chunks so the concatenation path is exercised
    monkeypatch.setattr(ops, "_TEMP_ELEMS", 64)
    rng = np.random.default_rng(3)
    c = O.random_gaussian(rng, 11, 29, 3)
    x = rng.normal(size=(9, 29)).astype(np.float32)
    y = ops.gaussian_matmul(
        mx.array(x), mx.array(c.amp), mx.array(c.mu), mx.array(c.sidx), c.sigma_grid, mx.array(c.perm)
    )
    _close(np.array(y), x.astype(np.float64) @ O.decode_gaussian(c).T)


def test_gaussian_plan_splits_conv_and_fft():
    plan = ops.gaussian_plan((0.3, 1.0, 40.0, 1.5), 200)
    assert plan.conv_w is not None and plan.fft_h is not None
    assert sorted(plan.slot) == [0, 1, 2, 3] and plan.slot[2] == 3  # the wide width goes last
    assert plan.fft_n >= 200 + ops.gaussian_reach(40.0, 200)


@pytest.mark.parametrize(
    "rows,cols,block,tokens",
    [(37, 53, 4, (3,)), (8, 8, 8, (1,)), (30, 17, 3, (2, 2)), (5, 6, 1, (1,)), (40, 24, 16, (6,))],
)
def test_circulant_ops(rows, cols, block, tokens):
    rng = np.random.default_rng(rows + block)
    c = O.random_circulant(rng, rows, cols, block)
    x = rng.normal(size=tokens + (cols,)).astype(np.float32)
    y = ops.circulant_matmul(mx.array(x), mx.array(c.spec_re), mx.array(c.spec_im), rows, cols, block)
    _close(np.array(y), x.astype(np.float64) @ O.decode_circulant(c).T)
    sr, si = ops.circulant_spectra(mx.array(c.spec_re), mx.array(c.spec_im))
    y2 = ops.circulant_matmul(mx.array(x), sr, si, rows, cols, block, freq_major=True)
    _close(np.array(y2), np.array(y), 1e-6)


@pytest.mark.parametrize("bits,group,tokens", [(4, 64, 1), (4, 32, 7), (8, 64, 3), (2, 32, 1)])
def test_quant_ops(bits, group, tokens, monkeypatch):
    monkeypatch.setattr(ops, "_TEMP_ELEMS", 4096)  # several row tiles
    rng = np.random.default_rng(bits * 10 + tokens)
    c = O.random_quant(rng, 45, 128, bits, group)
    x = rng.normal(size=(tokens, 128)).astype(np.float32)
    y = ops.quant_matmul(
        mx.array(x),
        mx.array(c.wq),
        mx.array(c.scales.astype(np.float32)),
        mx.array(c.biases.astype(np.float32)),
        group,
        bits,
    )
    _close(np.array(y), x.astype(np.float64) @ O.decode_quant(c).T, 1e-4)


# ---------------------------------------------------------------- Metal and CUDA text on the CPU

_CIRC_CASES = [(37, 53, 4, 1), (37, 53, 4, 11), (30, 17, 3, 2), (8, 8, 8, 9), (6, 5, 1, 1), (9, 12, 2, 5)]


@pytest.fixture(scope="session", params=["metal", "cuda"])
def kernel_lib(request, tmp_path_factory):
    """The Metal or the CUDA text of every kernel, compiled for the CPU by tests/metal_harness."""
    if not harness.gxx_available():
        pytest.skip("g++ not installed")
    inst = {
        (K.gaussian_launch(1, 8).name, K.gaussian_launch(1, 8).template),
        (K.gaussian_launch(64, 8).name, K.gaussian_launch(64, 8).template),
        (K.rotq_launch(1, 8).name, K.rotq_launch(1, 8).template),
        (K.rotq_launch(64, 8).name, K.rotq_launch(64, 8).template),
        ("rotate_direct", ()),
    }
    for rows, _, block, t in _CIRC_CASES:
        lc = K.circulant_launch(t, block, -(-rows // block))
        inst.add((lc.name, lc.template))
    return harness.build(sorted(inst), tmp_path_factory.mktemp("kernel_harness"), request.param)


@pytest.mark.parametrize(
    "rows,cols,k,t,perm",
    [
        (37, 53, 5, 1, True),
        (1, 7, 1, 1, False),
        (9, 600, 40, 3, True),
        (20, 33, 2, 37, True),
        (70, 45, 9, 5, False),
        (33, 1, 1, 2, False),
    ],
)
def test_text_gaussian(kernel_lib, rows, cols, k, t, perm):
    rng = np.random.default_rng(rows * 7 + k)
    c = O.random_gaussian(rng, rows, cols, k, perm=perm)
    x = rng.normal(size=(t, cols)).astype(np.float32)
    p = c.perm if c.perm is not None else np.arange(cols, dtype=np.int32)
    gcoef = np.array(K.gaussian_coefs(c.sigma_grid))
    launch = K.gaussian_launch(t, rows)
    got = kernel_lib.run(launch, [x, p, c.amp, c.mu, c.sidx, gcoef, np.array([t, rows, cols, k])], (t, rows))
    want = x.astype(np.float64) @ O.decode_gaussian(c).T
    _close(got, want)
    ref = ops.gaussian_matmul(
        mx.array(x),
        mx.array(c.amp),
        mx.array(c.mu),
        mx.array(c.sidx),
        c.sigma_grid,
        None if c.perm is None else mx.array(c.perm),
    )
    _close(got, np.array(ref))


@pytest.mark.parametrize("rows,cols,block,t", _CIRC_CASES)
def test_text_circulant(kernel_lib, rows, cols, block, t):
    rng = np.random.default_rng(rows * 3 + block + t)
    c = O.random_circulant(rng, rows, cols, block)
    x = rng.normal(size=(t, cols)).astype(np.float32)
    rb, cb, _ = c.spec_re.shape
    xs = np.fft.rfft(np.pad(x, [(0, 0), (0, cb * block - cols)]).reshape(t, cb, block), axis=-1)
    launch = K.circulant_launch(t, block, rb)
    got = kernel_lib.run(
        launch, [xs.real, xs.imag, c.spec_re, c.spec_im, np.array([t, rows, rb, cb])], (t, rows)
    )
    _close(got, x.astype(np.float64) @ O.decode_circulant(c).T)
    ref = ops.circulant_matmul(mx.array(x), mx.array(c.spec_re), mx.array(c.spec_im), rows, cols, block)
    _close(got, np.array(ref))


_ROTQ_CASES = [  # rows, cols, bits, group, trellis, tokens: straddling codes, partial tiles, both kernels
    (37, 64, 4, 32, False, 1),
    (19, 544, 3, 32, False, 3),  # two chunks of x in the decode kernel
    (45, 96, 5, 32, True, 1),
    (70, 128, 2, 64, True, 37),  # three row tiles, two token tiles
    (33, 64, 1, 32, False, 5),
    (9, 160, 6, 32, True, 2),
    (40, 128, 8, 128, True, 33),  # the largest codebook: 1,024 trellis levels
    (8, 32, 7, 32, False, 4),
]


@pytest.mark.parametrize("rows,cols,bits,group,trellis,t", _ROTQ_CASES)
def test_text_rotq(kernel_lib, rows, cols, bits, group, trellis, t):
    rng = np.random.default_rng(rows * 11 + bits)
    c = O.random_rotq(rng, rows, cols, bits, group, trellis)
    x = rng.normal(size=(t, cols)).astype(np.float32)
    params = K.rotq_params(t, rows, cols, bits, group, trellis, c.codebook.size)
    got = kernel_lib.run(K.rotq_launch(t, rows), [x, c.wq, c.group_scales(), c.codebook, params], (t, rows))
    _close(got, x.astype(np.float64) @ O.decode_rotq_rotated(c).T)


@pytest.mark.parametrize(
    "n,t,inverse", [(576, 1, False), (640, 3, True), (7, 2, False), (300, 4, True), (1, 1, False)]
)
def test_text_rotate_direct(kernel_lib, n, t, inverse):
    """The direct rotation kernel against the numpy FFT rotation (float64) of the same seed."""
    from mmt_mlx.fgs.encoders.rotation import rotate, rotation_params, unrotate

    seed = 3 + n
    signs, phase = rotation_params(n, seed)
    filt = np.fft.irfft(phase.astype(np.complex128), n).astype(np.float32)
    x = np.random.default_rng(n).normal(size=(t, n)).astype(np.float32)
    params = np.array([t, n, int(inverse)])
    got = kernel_lib.run(K.rotate_launch(t, n), [x, signs, filt, params], (t, n))
    want = (unrotate if inverse else rotate)(x.astype(np.float64), seed)
    _close(got, want, 1e-5)
    back = kernel_lib.run(
        K.rotate_launch(t, n), [got, signs, filt, np.array([t, n, int(not inverse)])], (t, n)
    )
    _close(back, x, 1e-5)  # orthogonal: R^T R x = x


def test_rotq_params_refuse_what_the_kernels_cannot_hold():
    assert K.rotq_params(1, 8, 64, 3, 32, True, 32) == [1, 8, 64, 3, 32, 1, 6, 32]
    for bad in (
        (64, 9, 32, False, 512),
        (40, 4, 32, False, 16),
        (64, 4, 48, False, 16),
        (64, 8, 32, True, 2048),
    ):
        with pytest.raises(ValueError, match="rotq kernel"):
            K.rotq_params(1, 8, *bad)


@pytest.mark.parametrize("tokens", [1, 6])
def test_rotq_layers_on_the_kernel_path(kernel_lib, monkeypatch, tokens):
    """RotQLevel and banded FGSLinear with use_kernel=True: the kernel text (run on the CPU in place of MLX's
    kernel call) against the MLX reference path and the codec's dense decode."""
    from mmt_mlx.fgs.codec import decode_tensor
    from mmt_mlx.fgs.codes import TensorCode, row_mask
    from mmt_mlx.fgs.encoders.gauss_codes import encode_rotq
    from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear

    calls = []

    def harness_run(launch, inputs, out_shape):
        calls.append(launch.name)
        return mx.array(kernel_lib.run(launch, [np.array(a) for a in inputs], out_shape))

    monkeypatch.setattr(K, "_run", harness_run)
    monkeypatch.setenv("MMT_NATIVE", "0")
    rng = np.random.default_rng(5)
    rows, cols = 90, 192
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    bands = [np.arange(0, rows, 3), np.setdiff1d(np.arange(rows), np.arange(0, rows, 3))]
    levels = []
    for ids, (bits, trellis) in zip(bands, ((5, True), (3, False))):
        code = encode_rotq(w[ids], bits, 64, 7, None, log_scales=True, trellis=trellis)
        code.row_mask, code.tensor_rows = row_mask(ids, rows), rows
        levels.append(code)
    tc = TensorCode((rows, cols), levels)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    got = np.array(FGSLinear(tc, use_kernel=True)(mx.array(x)))
    rotations = ["rotate_direct"] if tokens <= K.ROTATE_DIRECT_MAX_TOKENS else []  # prompts: MLX's FFT
    # both bands rotate the same input with the same seed: one rotation, shared
    assert calls == rotations + [K.rotq_launch(tokens, len(ids)).name for ids in bands]
    ref = np.array(FGSLinear(tc, use_kernel=False)(mx.array(x)))
    _close(got, ref, 1e-5)
    _close(got, x.astype(np.float64) @ decode_tensor(tc).T.astype(np.float64), 1e-5)
    calls.clear()  # an embedding lookup decodes its rows in each band, then un-rotates them with the kernel
    ids = [0, 89, 3, 3]
    emb = np.array(FGSEmbedding(tc, use_kernel=True)(mx.array([ids])))[0]
    assert calls == ["rotate_direct"] * len(bands)
    np.testing.assert_allclose(emb, decode_tensor(tc)[ids], rtol=1e-4, atol=1e-6)


def test_kernel_sources_complete():
    for name, spec in K.SPECS.items():
        for ext in ("metal", "cu"):
            body = K.kernel_source(name, ext)
            assert "=== kernel" not in body and len(body) > 200
            for n, _ in spec.inputs:
                assert n in body, (name, ext, n)
    assert "metal::" not in K.kernel_source("circulant_matmul", "cu")


# ---------------------------------------------------------------- CUDA text: compile only


def _cuda_wrap(launch: K.Launch) -> str:
    """Mimics MLX's build_kernel (mlx/backend/cuda/custom_kernel.cpp): header, namespace, signature,
    template ints as constexpr, body. MLX's own utils.cuh is not here: nothing of it is used."""
    spec = K.SPECS[launch.name]
    params = [f"    const {harness._CTYPES[dt]}* {n}" for n, dt in spec.inputs] + [
        f"    float* {n}" for n in spec.outputs
    ]
    consts = "".join(f"  constexpr int {n} = {v};\n" for n, v in launch.template)
    fn = "custom_kernel_" + launch.name + "".join(f"_{v}" for _, v in launch.template)
    return (
        "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        f"__global__ void {fn}(\n"
        + ",\n".join(params)
        + ") {\n"
        + consts
        + "\n"
        + K.kernel_source(launch.name, "cu")
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_bodies_compile(tmp_path):
    launches = [
        K.gaussian_launch(1, 100),
        K.gaussian_launch(100, 100),
        K.circulant_launch(1, 4, 10),
        K.circulant_launch(64, 8, 10),
        K.circulant_launch(1, 3, 10),
        K.rotq_launch(1, 100),
        K.rotq_launch(100, 100),
        K.rotate_launch(1, 576),
    ]
    src = "#include <cooperative_groups.h>\n#include <cstdint>\n\n" + "".join(
        _cuda_wrap(lc) for lc in launches
    )
    cu = tmp_path / "fgs_kernels.cu"
    cu.write_text(src)
    res = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_80", "-c", str(cu), "-o", str(tmp_path / "k.o")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
