"""GPU kernels of the FGS levels: sources, launch geometry, and cached mx.fast kernel objects.

Kernel bodies live in the top-level ``kernels/`` folder (installed as ``mmt_mlx.kernels``), one or more
per file, each section introduced by a ``// === kernel: NAME ===`` line. The same text is compiled by MLX
on Apple GPUs (``mx.fast.metal_kernel``) or NVIDIA GPUs (``mx.fast.cuda_kernel``), and on Linux CPU by
``tests/metal_harness`` (Metal) and nvcc (CUDA, compile only), so the launch geometry below is shared.

The quant level needs no kernel of ours: ``mx.quantized_matmul`` reads the MLX affine format directly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import mlx.core as mx

_MARKER = re.compile(r"^// === kernel: (\w+) ===[ \t]*$", re.MULTILINE)

# Up to this many tokens the Gaussian level uses the decode kernel (one token per threadgroup).
GAUSSIAN_DECODE_MAX_TOKENS = 4
GAUSSIAN_DECODE_TC = 512  # columns of x per threadgroup chunk (2 KB of threadgroup memory)
CIRCULANT_PREFILL_TT = 8  # tokens per threadgroup in the circulant kernel when prefilling


@dataclass(frozen=True)
class KernelSpec:
    name: str
    file: str  # kernels/<file>.metal and kernels/<file>.cu
    inputs: tuple[tuple[str, str], ...]  # (name, dtype name) in call order
    outputs: tuple[str, ...]


_GAUSS_INPUTS = (
    ("x", "float32"),
    ("perm", "int32"),
    ("amp", "float32"),
    ("mu", "int32"),
    ("sidx", "uint8"),
    ("gcoef", "float32"),
    ("params", "int32"),
)
_ROTQ_INPUTS = (
    ("x", "float32"),
    ("wq", "uint32"),
    ("scales", "float32"),
    ("codebook", "float32"),
    ("params", "int32"),
)
ROTATE_DIRECT_MAX_TOKENS = 4  # up to this many tokens the rotation is one direct kernel, beyond it MLX's FFT
ROTATE_DIRECT_MAX_WIDTH = 4096  # the kernel's threadgroup copy of a token (16 KB)
ROTQ_MAX_LEVELS = 1024  # the kernels' threadgroup codebook: trellis codes of up to 8 bits (4 << 8 levels)
SPECS: dict[str, KernelSpec] = {
    "gaussian_matmul_decode": KernelSpec("gaussian_matmul_decode", "gaussian_matmul", _GAUSS_INPUTS, ("y",)),
    "gaussian_matmul_prefill": KernelSpec(
        "gaussian_matmul_prefill", "gaussian_matmul", _GAUSS_INPUTS, ("y",)
    ),
    "rotq_matmul_decode": KernelSpec("rotq_matmul_decode", "rotq_matmul", _ROTQ_INPUTS, ("y",)),
    "rotq_matmul_prefill": KernelSpec("rotq_matmul_prefill", "rotq_matmul", _ROTQ_INPUTS, ("y",)),
    "rotate_direct": KernelSpec(
        "rotate_direct",
        "rotation",
        (("x", "float32"), ("signs", "float32"), ("filt", "float32"), ("params", "int32")),
        ("y",),
    ),
    "circulant_matmul": KernelSpec(
        "circulant_matmul",
        "circulant_matmul",
        (("xr", "float32"), ("xi", "float32"), ("sr", "float32"), ("si", "float32"), ("params", "int32")),
        ("y",),
    ),
}


@dataclass(frozen=True)
class Launch:
    """One kernel call's geometry: grid in threads (as mx.fast kernels take it) and compile-time ints."""

    name: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: tuple[tuple[str, int], ...]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _row_product_launch(kernel: str, tokens: int, rows: int) -> Launch:
    """Geometry of the weight-synthesizing products (Gaussian and rotq levels): for a few tokens 8 rows x 32 lanes
    per threadgroup, one token per grid z; past that 32 x 32 output tiles."""
    # grids are whole threadgroups: Metal would shrink a group to a smaller grid, CUDA rounds up
    if tokens <= GAUSSIAN_DECODE_MAX_TOKENS:
        return Launch(
            f"{kernel}_decode", (256, 8 * _ceil(rows, 8), tokens), (256, 1, 1), (("TC", GAUSSIAN_DECODE_TC),)
        )
    return Launch(f"{kernel}_prefill", (256, _ceil(rows, 32), _ceil(tokens, 32)), (256, 1, 1), ())


def gaussian_launch(tokens: int, rows: int) -> Launch:
    return _row_product_launch("gaussian_matmul", tokens, rows)


def rotq_launch(tokens: int, rows: int) -> Launch:
    return _row_product_launch("rotq_matmul", tokens, rows)


def rotate_launch(tokens: int, n: int) -> Launch:
    return Launch("rotate_direct", (256 * _ceil(n, 256), 1, tokens), (256, 1, 1), ())


def rotate_direct_fits(tokens: int, n: int) -> bool:
    """Whether the direct rotation kernel takes these tokens (a decode step); prompts keep MLX's FFT."""
    return tokens <= ROTATE_DIRECT_MAX_TOKENS and n <= ROTATE_DIRECT_MAX_WIDTH


def circulant_launch(tokens: int, block: int, row_blocks: int) -> Launch:
    if block > 256:
        raise ValueError(f"circulant kernel supports blocks up to 256 (got {block})")
    ig = max(1, 128 // block)
    tt = 1 if tokens <= GAUSSIAN_DECODE_MAX_TOKENS else CIRCULANT_PREFILL_TT
    return Launch(
        "circulant_matmul",
        (block, ig * _ceil(row_blocks, ig), _ceil(tokens, tt)),
        (block, ig, 1),
        (("BLOCK", block), ("IG", ig), ("TT", tt)),
    )


@cache
def kernel_sources(file: str, ext: str) -> dict[str, str]:
    """Every kernel body in kernels/<file>.<ext>, by name (text between marker lines, verbatim)."""
    text = resources.files("mmt_mlx.kernels").joinpath(f"{file}.{ext}").read_text()
    parts = _MARKER.split(text)
    return {parts[i]: parts[i + 1].strip("\n") + "\n" for i in range(1, len(parts), 2)}


def kernel_source(name: str, ext: str) -> str:
    return kernel_sources(SPECS[name].file, ext)[name]


def gpu_backend() -> str | None:
    """'metal', 'cuda' or None: which custom-kernel backend this MLX can run."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def use_kernels() -> bool:
    """MMT_FGS_BACKEND=reference|kernel forces a path; by default kernels run where a GPU backend is."""
    choice = os.environ.get("MMT_FGS_BACKEND", "").strip().lower()
    if choice == "reference":
        return False
    if choice == "kernel":
        return True
    if choice:
        raise ValueError(f"MMT_FGS_BACKEND must be 'reference' or 'kernel', not {choice!r}")
    return gpu_backend() is not None


@cache
def _kernel(name: str, backend: str):  # returns the mx.fast kernel object, built once
    spec = SPECS[name]
    ins = [n for n, _ in spec.inputs]
    if backend == "metal":
        return mx.fast.metal_kernel(
            name=name, input_names=ins, output_names=list(spec.outputs), source=kernel_source(name, "metal")
        )
    if backend == "cuda":
        return mx.fast.cuda_kernel(
            name=name, input_names=ins, output_names=list(spec.outputs), source=kernel_source(name, "cu")
        )
    raise RuntimeError(f"no kernel backend {backend!r}")


def _run(launch: Launch, inputs: list[mx.array], out_shape: tuple[int, ...]) -> mx.array:
    backend = gpu_backend() or "metal"  # forced without a GPU: let MLX raise its own "No ... back-end"
    kern = _kernel(launch.name, backend)
    return kern(
        inputs=inputs,
        template=list(launch.template),
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=[out_shape],
        output_dtypes=[mx.float32],
    )[0]


def gaussian_coefs(sigma_grid: list[float] | tuple[float, ...]) -> mx.array:
    """-1 / (2 sigma^2) per grid width (what the kernel multiplies d^2 with)."""
    return mx.array([-0.5 / (float(s) * float(s)) for s in sigma_grid], dtype=mx.float32)


def gaussian_matmul(
    x: mx.array,
    amp: mx.array,
    mu: mx.array,
    sidx: mx.array,
    gcoef: mx.array,
    perm: mx.array,
) -> mx.array:
    """Kernel version of ops.gaussian_matmul: amp f32, mu int32, sidx uint8 (rows, K); perm int32 (cols,)."""
    lead = tuple(x.shape[:-1])
    cols = x.shape[-1]
    xf = x.reshape(-1, cols).astype(mx.float32)
    t = xf.shape[0]
    rows, k = amp.shape
    params = mx.array([t, rows, cols, k], dtype=mx.int32)
    launch = gaussian_launch(t, rows)
    y = _run(launch, [xf, perm, amp, mu, sidx, gcoef, params], (t, rows))
    return y.astype(x.dtype).reshape(*lead, rows)


def rotate_direct(x: mx.array, signs: mx.array, filt: mx.array, inverse: bool = False) -> mx.array:
    """R x (or R^T x) along the last axis of a few tokens: the circular convolution with the rotation's filter
    ``filt`` = irfft(phase) computed directly (kernels/rotation.*); signs and filt f32 (n,)."""
    lead = tuple(x.shape[:-1])
    n = x.shape[-1]
    xf = x.reshape(-1, n).astype(mx.float32)
    t = xf.shape[0]
    if not rotate_direct_fits(t, n):
        raise ValueError(f"rotate_direct: {t} tokens of width {n} are for the FFT path")
    params = mx.array([t, n, int(bool(inverse))], dtype=mx.int32)
    return _run(rotate_launch(t, n), [xf, signs, filt, params], (t, n)).reshape(*lead, n)


def rotq_params(
    tokens: int, rows: int, cols: int, bits: int, group: int, trellis: bool, levels: int
) -> list[int]:
    """The rotq kernels' int32 params: [T, rows, cols, bits, group, trellis, words per row, codebook levels]."""
    if not 1 <= bits <= 8 or levels > ROTQ_MAX_LEVELS or (cols * bits) % 32 or cols % group:
        raise ValueError(
            f"rotq kernel: no layout for {bits}-bit codes in groups of {group} over {cols} columns"
        )
    return [tokens, rows, cols, bits, group, int(bool(trellis)), cols * bits // 32, levels]


def rotq_matmul(
    x: mx.array, wq: mx.array, scales: mx.array, codebook: mx.array, bits: int, group: int, trellis: bool
) -> mx.array:
    """y = x @ W.T with W synthesized from rotq codes (x already rotated): wq uint32 (rows, words), scales f32
    (rows, cols // group), codebook f32 (2**bits, or 4 << bits for trellis codes)."""
    lead = tuple(x.shape[:-1])
    cols = x.shape[-1]
    xf = x.reshape(-1, cols).astype(mx.float32)
    t, rows = xf.shape[0], wq.shape[0]
    params = mx.array(rotq_params(t, rows, cols, bits, group, trellis, codebook.size), dtype=mx.int32)
    y = _run(rotq_launch(t, rows), [xf, wq, scales, codebook, params], (t, rows))
    return y.astype(x.dtype).reshape(*lead, rows)


def circulant_matmul(
    x: mx.array, spec_re: mx.array, spec_im: mx.array, rows: int, cols: int, block: int
) -> mx.array:
    """Kernel version of ops.circulant_matmul; spectra (Rb, Cb, block//2+1) f32 as stored."""
    lead = tuple(x.shape[:-1])
    xf = x.reshape(-1, cols).astype(mx.float32)
    t = xf.shape[0]
    rb, cb, _ = spec_re.shape
    if cb * block != cols:
        xf = mx.pad(xf, [(0, 0), (0, cb * block - cols)])
    xs = mx.fft.rfft(xf.reshape(t, cb, block), axis=-1)
    params = mx.array([t, rows, rb, cb], dtype=mx.int32)
    launch = circulant_launch(t, block, rb)
    y = _run(launch, [mx.real(xs), mx.imag(xs), spec_re, spec_im, params], (t, rows))
    return y.astype(x.dtype).reshape(*lead, rows)
