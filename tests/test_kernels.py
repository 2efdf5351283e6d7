"""FGS products: reference ops and GPU kernel text, against a float64 numpy oracle.

The Metal bodies run on the CPU through tests/metal_harness (g++, one std::thread per thread of a
threadgroup); the CUDA bodies are compiled with nvcc, wrapped as mx.fast.cuda_kernel wraps them.
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


# ---------------------------------------------------------------- Metal text on the CPU

_CIRC_CASES = [(37, 53, 4, 1), (37, 53, 4, 11), (30, 17, 3, 2), (8, 8, 8, 9), (6, 5, 1, 1), (9, 12, 2, 5)]


@pytest.fixture(scope="session")
def metal_lib(tmp_path_factory):
    if not harness.gxx_available():
        pytest.skip("g++ not installed")
    inst = {
        (K.gaussian_launch(1, 8).name, K.gaussian_launch(1, 8).template),
        (K.gaussian_launch(64, 8).name, K.gaussian_launch(64, 8).template),
    }
    for rows, _, block, t in _CIRC_CASES:
        lc = K.circulant_launch(t, block, -(-rows // block))
        inst.add((lc.name, lc.template))
    return harness.build(sorted(inst), tmp_path_factory.mktemp("metal_harness"))


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
def test_metal_gaussian(metal_lib, rows, cols, k, t, perm):
    rng = np.random.default_rng(rows * 7 + k)
    c = O.random_gaussian(rng, rows, cols, k, perm=perm)
    x = rng.normal(size=(t, cols)).astype(np.float32)
    p = c.perm if c.perm is not None else np.arange(cols, dtype=np.int32)
    gcoef = np.array(K.gaussian_coefs(c.sigma_grid))
    launch = K.gaussian_launch(t, rows)
    got = metal_lib.run(launch, [x, p, c.amp, c.mu, c.sidx, gcoef, np.array([t, rows, cols, k])], (t, rows))
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
def test_metal_circulant(metal_lib, rows, cols, block, t):
    rng = np.random.default_rng(rows * 3 + block + t)
    c = O.random_circulant(rng, rows, cols, block)
    x = rng.normal(size=(t, cols)).astype(np.float32)
    rb, cb, _ = c.spec_re.shape
    xs = np.fft.rfft(np.pad(x, [(0, 0), (0, cb * block - cols)]).reshape(t, cb, block), axis=-1)
    launch = K.circulant_launch(t, block, rb)
    got = metal_lib.run(
        launch, [xs.real, xs.imag, c.spec_re, c.spec_im, np.array([t, rows, rb, cb])], (t, rows)
    )
    _close(got, x.astype(np.float64) @ O.decode_circulant(c).T)
    ref = ops.circulant_matmul(mx.array(x), mx.array(c.spec_re), mx.array(c.spec_im), rows, cols, block)
    _close(got, np.array(ref))


def test_kernel_sources_complete():
    for name, spec in K.SPECS.items():
        for ext in ("metal", "cu"):
            body = K.kernel_source(name, ext)
            assert "=== kernel" not in body and len(body) > 200
            for n, _ in spec.inputs:
                assert n in body, (name, ext, n)
    assert "metal::" not in K.kernel_source("circulant_matmul", "cu")


# ---------------------------------------------------------------- CUDA text: compile only

_CUDA_TYPES = {"float32": "float", "int32": "int32_t", "uint8": "uint8_t"}


def _cuda_wrap(launch: K.Launch) -> str:
    """Mimics MLX's build_kernel (mlx/backend/cuda/custom_kernel.cpp): header, namespace, signature,
    template ints as constexpr, body. MLX's own utils.cuh is not here: nothing of it is used."""
    spec = K.SPECS[launch.name]
    params = [f"    const {_CUDA_TYPES[dt]}* {n}" for n, dt in spec.inputs] + [
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
