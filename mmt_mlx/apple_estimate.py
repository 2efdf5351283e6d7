"""Apple Silicon decode estimates that include per-kernel dispatch time, not only bandwidth.

Small models do not reach bandwidth / bytes on Apple GPUs: every kernel of a decode step costs a few
microseconds of dispatch and synchronization even when it moves almost no data. The estimate is

    seconds per token = bytes per token / peak bandwidth + kernels per token x DISPATCH_S

with kernels counted in the real MLX graph of one decode step, built as the GPU would see it: MLX's fused
``mx.fast`` ops (RMSNorm, RoPE, attention) are one Metal kernel each but decompose into a dozen ops on the CPU,
so each is counted once, as is each of our rotq kernels (product, decode rotation), and view-only primitives
(reshapes, broadcasts, transposes) are not counted.

DISPATCH_S = 2.75 us: ml-explore/mlx issue #4521 (M3 Ultra, mlx 0.32.2) measured a synthetic chain of 3,200
tiny dependent kernels at 8.8 ms per step (2.75 us each) with MLX's default command-buffer settings; an
independent Metal runtime measured 5.16 us of GPU time per added dispatch in Gemma-2-2B decode
(antonellof/ferrox issue #149). The lower figure is used, so the estimate is still an upper bound, but one
in the range published mlx-lm runs of sub-1B models reach rather than the 1,000+ tok/s of bandwidth alone.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager, nullcontext

import mlx.core as mx
from mlx.utils import tree_flatten

from mmt_mlx.fgs.runtime import kernels as K
from mmt_mlx.fgs.runtime.rotq_layer import RotQLevel

DISPATCH_S = 2.75e-6
# Primitives that are views or bookkeeping on Metal (no kernel launched).
_NO_KERNEL = {
    "Broadcast", "BroadcastAxes", "Reshape", "ExpandDims", "Squeeze", "Transpose", "AsStrided", "Depends",
    "StopGradient", "Flatten", "Unflatten", "Slice", "Split", "NumberOfElements", "Load",
}  # fmt: skip


@contextmanager
def _fgs_gpu_kernels(model):
    """The rotq levels on their GPU kernel path (kernels/rotq_matmul.*, kernels/rotation.*), each kernel call
    standing in as one reduction node: a product and a decode token's rotation are one dispatch each on a GPU,
    where the MLX reference path the CPU builds is a dozen ops."""
    levels = [m for m in model.modules() if isinstance(m, RotQLevel)]
    saved = [(lv.use_kernel, lv.rotation.use_kernel) for lv in levels]
    run = K._run
    K._run = lambda launch, inputs, out_shape: mx.broadcast_to(mx.sum(inputs[0]), out_shape)
    for lv in levels:
        lv.use_kernel = lv.rotation.use_kernel = True
    try:
        yield
    finally:
        K._run = run
        for lv, (uk, rk) in zip(levels, saved):
            lv.use_kernel, lv.rotation.use_kernel = uk, rk


@contextmanager
def _gpu_like_graph():
    """Stand in one elementwise op for each fused mx.fast op; keep the FGS layers off the native CPU path."""
    saved = {
        n: getattr(mx.fast, n) for n in ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")
    }
    env = os.environ.get("MMT_NATIVE")
    mx.fast.rms_norm = lambda x, *a, **k: x * 1.0
    mx.fast.layer_norm = lambda x, *a, **k: x * 1.0
    mx.fast.rope = lambda x, *a, **k: x * 1.0
    mx.fast.scaled_dot_product_attention = lambda q, k, v, **kw: q * 1.0  # (B, H, L, D) like the real one
    os.environ["MMT_NATIVE"] = "0"
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(mx.fast, n, f)
        if env is None:
            os.environ.pop("MMT_NATIVE", None)
        else:
            os.environ["MMT_NATIVE"] = env


def count_kernels(model, token: int = 1, fgs_kernels: bool = True) -> int:
    """Kernels per decode step on an Apple GPU, from the MLX graph of one step (built, never run);
    ``fgs_kernels=False`` counts the rotq levels' MLX reference path instead of their kernels."""
    with _gpu_like_graph(), _fgs_gpu_kernels(model) if fgs_kernels else nullcontext():
        cache = model.make_cache()
        logits = model(mx.array([[token]]), cache)[0, -1]
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        states = [a for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]
        mx.export_to_dot(path, logits, *states)  # the KV-cache writes are kernels too
        labels = re.findall(r'label ="([^"]+)", shape=rectangle', open(path).read())
    finally:
        os.unlink(path)
    return sum(1 for name in labels if name.split()[0] not in _NO_KERNEL)


def decode_tok_s(bytes_per_token: float, bandwidth: float, kernels: int) -> float:
    seconds = bytes_per_token / bandwidth + kernels * DISPATCH_S
    return 1.0 / seconds if seconds > 0 else float("inf")
