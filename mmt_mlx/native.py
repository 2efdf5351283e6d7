"""The native CPU kernels (MLX C++ extension ``mmt_mlx._native``, sources in kernels/cpu/): loading, checks, use.

The extension is built by ``pip install`` when a C++ compiler and CMake are there (setup.py); without it, or
when it was built against another MLX than the one installed (MLX has no stable C++ ABI), everything runs on
the MLX-ops reference path and one line says so. ``MMT_NATIVE=0`` forces the MLX ops, ``MMT_NATIVE=1`` makes
a missing extension an error; the default uses it on the CPU device when it loads. ``MMT_FUSED_LAYER=0`` keeps
decode on the separate per-op nodes (the fused decode layer is on by default).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import numpy as np

VERSION_FILE = Path(__file__).resolve().parent / "_native_mlx_version.txt"

_module: ModuleType | None = None
_reason: str = ""
_loaded = False
_warned = False
_suspended = 0  # > 0 inside suspended(): the MLX ops run (autograd: the native nodes have no vjp)


def _load() -> ModuleType | None:
    global _module, _reason, _loaded
    if _loaded:
        return _module
    _loaded = True
    built = VERSION_FILE.read_text().strip() if VERSION_FILE.exists() else None
    if built is not None and built != mx.__version__:
        _reason = f"built for mlx {built}, mlx {mx.__version__} is installed; reinstall mmt-mlx"
        return None
    try:
        mod = import_module("mmt_mlx._native")
    except ImportError as e:
        _reason = f"not built ({e})" if "_native" in str(e) else f"failed to load ({e})"
        return None
    if mod.built_mlx_version() != mx.__version__:
        _reason = f"built for mlx {mod.built_mlx_version()}, mlx {mx.__version__} is installed"
        return None
    _module = mod
    return mod


def reset() -> None:
    """Forget what was loaded (tests simulate an absent extension with it)."""
    global _module, _reason, _loaded, _warned
    _module, _reason, _loaded, _warned = None, "", False, False


def mode() -> str:
    return os.environ.get("MMT_NATIVE", "auto").strip().lower()


def available() -> bool:
    return _load() is not None


@contextmanager
def suspended() -> Iterator[None]:
    """Within it, models build MLX-ops graphs (what gradients need: the native nodes define no vjp)."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def enabled() -> bool:
    """Whether the quant products run on the native kernels now (CPU device, extension loaded, not forced off)."""
    global _warned
    m = mode()
    if _suspended or m in ("0", "off", "false", "reference") or mx.default_device() != mx.cpu:
        return False
    if _load() is not None:
        return True
    if m in ("1", "on", "true", "native"):
        raise RuntimeError(f"MMT_NATIVE={m} but the native CPU kernels are unavailable: {_reason}")
    if not _warned:
        _warned = True
        print(f"mmt_mlx: native CPU kernels unavailable ({_reason}); running on MLX ops", file=sys.stderr)
    return False


def fused_layers() -> bool:
    """Whether a lone decoded token runs each decoder layer as one native node (``MMT_FUSED_LAYER=0``: off)."""
    return os.environ.get("MMT_FUSED_LAYER", "1").strip().lower() not in ("0", "off", "false") and enabled()


def quant_matmul(
    x: mx.array, wq: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """y = x @ W.T for W in MLX's affine layout, on the native kernel; x (..., cols) -> (..., rows).

    Up to ``gemm_min_tokens() - 1`` tokens the integer kernels stream the codes; more tokens (a prompt) go
    through the integer GEMM (on CPUs without AVX2, W decoded in row blocks into the f32 GEMM)."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    y = mod.affine_matmul(x, wq, scales, biases, group_size, bits)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


def codebook_enabled(group_size: int) -> bool:
    """Whether codebook codes (the rotated Gaussian codes) in these groups run on the native kernels now: they
    need the integer kernels (AVX2); elsewhere the MLX-ops path serves them."""
    return enabled() and group_size % 32 == 0 and bool(_require().codebook_matmul_available())


def codebook_matmul(
    x: mx.array, wq: mx.array, scales: mx.array, codebook: mx.array, group_size: int, bits: int
) -> mx.array:
    """y = x @ W.T for W = scale * codebook[code] (codes packed as MLX's affine layout packs them), on the
    integer GEMM for any token count: the levels rounded to 1/2047 of the largest, x to int16 per 32 columns
    (kernels/cpu/int_gemm.inc); a token's outputs do not depend on the other tokens of the call."""
    y = _require().codebook_matmul(x, wq, scales, codebook, group_size, bits)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


def tcq_quantize(t: np.ndarray, w: np.ndarray, lut: np.ndarray, bits: int, state0: int) -> np.ndarray | None:
    """The trellis codes' Viterbi search of one sequence (kernels/cpu/trellis.h), uint8 codes; None where the
    extension is not built (conversion then takes the numpy reference). Whatever MMT_NATIVE says: it changes
    no result, only the time."""
    mod = _load()
    if mod is None:
        return None
    out = np.empty(len(t), np.uint8)
    mod.tcq_quantize(np.ascontiguousarray(t, np.float32), np.ascontiguousarray(w, np.float32),
                     np.ascontiguousarray(lut, np.float32), bits, int(state0), out)  # fmt: skip
    return out


def fft_rotate(x: mx.array, signs: mx.array, phase: mx.array, inverse: bool = False) -> mx.array:
    """The rotated codes' FFT rotation of each row of x (``phase``: (n // 2 + 1, 2) re/im), or its inverse, as
    one native node (kernels/cpu/rotation.cpp); f32."""
    return _require().fft_rotate(x, signs, phase, inverse)


def gemm_min_tokens() -> int:
    """Token count from which native.quant_matmul takes the prompt GEMM (kernels/cpu/affine_gemm.h)."""
    return int(_require().gemm_min_tokens())


def gaussian_matmul(
    x: mx.array, amp: mx.array, index: mx.array, perm: mx.array, taps: mx.array, reach: mx.array
) -> mx.array:
    """y = x @ W.T for a Gaussian level (operands: ``GaussianLevel.native_operands``), on the native kernel."""
    y = _require().gaussian_matmul(x, amp, index, perm, taps, reach)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


def dequantize(wq: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """W (rows, cols) f32 of MLX's affine layout, one native node (MLX's CPU dequantize is scalar: 2-8x slower
    than the GEMM it feeds for 5- and 6-bit codes)."""
    return _require().affine_dequantize(wq, scales, biases, group_size, bits)


def rms_norm(x: mx.array, w: mx.array, eps: float) -> mx.array:
    """x * rsqrt(mean(x^2, -1) + eps) * w as one native node (MLX's CPU rms_norm is ~8 small ops)."""
    y = _require().rms_norm(x, w, eps)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


def rope(x: mx.array, offset: mx.array, dims: int, base: float, scale: float) -> mx.array:
    """Half-split RoPE of x (B, H, T, D) at positions offset[b] + t, as one native node (MLX's CPU rope is
    ~20 small ops: arange, exp, cos, sin, ...)."""
    y = _require().rope(x, offset, dims, base, scale)
    return y if x.dtype == mx.float32 else y.astype(x.dtype)


def decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None) -> mx.array:
    """softmax(scale q k^T) v for (B, H, L, D) views with grouped KV heads and a bool mask, as one native node
    returning (B, Lq, Hq * D) (MLX's CPU attention is ~12 nodes with the transpose back)."""
    y = _require().decode_attention(q, k, v, scale, mask)
    return y if q.dtype == mx.float32 else y.astype(q.dtype)


def _require() -> ModuleType:
    mod = _load()
    if mod is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_reason}")
    return mod


def advise_hugepages(model) -> int:
    """Put the model's large weight buffers on 2 MB pages (Linux; ``MMT_HUGEPAGES=0``: off) when the native
    kernels serve it; returns the bytes moved now. Decode streams every weight once per token: 4 KB pages cost
    a TLB miss and a prefetcher stop every 4 KB (kernels/cpu/hugepages.h)."""
    from mlx.utils import tree_flatten

    if os.environ.get("MMT_HUGEPAGES", "1").strip().lower() in ("0", "off", "false") or not enabled():
        return 0
    big = [v for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array) and v.nbytes >= 1 << 21]
    return int(_require().advise_hugepages(big))


def set_threads(n: int) -> None:
    """Threads of the native kernels (n <= 0: MMT_THREADS or all cores)."""
    mod = _load()
    if mod is not None:
        mod.set_num_threads(n)


def describe() -> dict[str, object]:
    """What ``mmt info`` prints: the path in use and the CPU features behind it."""
    mod = _load()
    info: dict[str, object] = {"mode": mode(), "device": str(mx.default_device()), "mlx": mx.__version__}
    if mod is None:
        info.update(path="MLX ops (reference)", reason=_reason)
    else:
        info.update(
            path="native CPU kernels" if enabled() else "MLX ops (reference)",
            isa=mod.isa(),
            threads=mod.num_threads(),
            fused_decode_layers=fused_layers(),
            built_for_mlx=mod.built_mlx_version(),
        )
    return info


def argmax(x: mx.array) -> mx.array:
    """mx.argmax(x, axis=-1) (uint32, the same index, NaNs included), as one vectorized node on the native path:
    MLX's CPU argmax is a scalar loop (0.28-0.31 ms over Gemma 3's 262,144 logits, 0.09 here)."""
    if x.dtype == mx.float32 and x.ndim >= 1 and x.shape[-1] > 0 and enabled():
        return _require().argmax_last(x)
    return mx.argmax(x, axis=-1)


def gated_activation(gate: mx.array, up: mx.array, gelu: bool) -> mx.array:
    """act(gate) * up (SiLU, or GELU's tanh approximation) as one native node (MLX's CPU ops are 3-9 nodes)."""
    y = _require().gated_activation(gate, up, gelu)
    return y if gate.dtype == mx.float32 else y.astype(gate.dtype)


def decode_layer(
    x: mx.array,
    k_cache: mx.array,
    v_cache: mx.array,
    norms: list[mx.array],
    weights: list[mx.array],
    bits: list[int],
    groups: list[int],
    **config: float | int | bool | list[bool],
) -> list[mx.array]:
    """One decoder layer for one token as one native node (kernels/cpu/decode_layer.h): [h, keys', values']."""
    return _require().decode_layer(x, k_cache, v_cache, norms, weights, bits, groups, **config)


def set_layer_profile(on: bool) -> None:
    """Time the fused decode layers' sections (bench/decode_profile.py); off by default."""
    _require().set_layer_profile(on)


def take_layer_profile() -> dict[str, float]:
    """ms spent in the fused layers' products, attention and the rest, and how many layers ran, since the last
    call (then reset)."""
    products, attention, rest, layers = _require().take_layer_profile()
    return {"products": products, "attention": attention, "rest": rest, "layers": layers}
