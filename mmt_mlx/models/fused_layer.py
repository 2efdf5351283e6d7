"""A lone decoded token runs each decoder layer as one native node (``kernels/cpu/decode_layer.h``).

Built from MLX ops a layer is ~25 graph nodes per token; MLX's CPU scheduler keeps only a few tasks in flight,
so queuing step t+1 ran most of step t on the host thread and graph building never overlapped computation
(``bench/decode_host_time.py``). As one node per layer the host builds the next token's graph while this one
runs, and the products use every core. It applies when the native kernels are on, one request decodes one
token, its cache is a plain or sliding-window cache with earlier tokens, and every product of the layer has
MLX's affine layout, plus at most a Gaussian level (a linear layer offering ``fused_operands()``). Otherwise the
layer's separate ops run; both give the same bits (the node calls the same kernel functions). ``MMT_FUSED_LAYER=0`` turns it off (A/B runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mmt_mlx import native
from mmt_mlx.cache import BatchCache, KVCache, SlidingKVCache


@dataclass
class LayerSpec:
    """What the node needs of one decoder layer; the model's block describes itself with it."""

    norms: list[mx.array]  # input, (q, k), (post-attention), pre-MLP, (post-MLP): the weights as multiplied
    linears: list  # q, k, v, o, gate, up, down projections
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_base: float
    rope_scale: float
    attn_scale: float
    gelu: bool = False
    qk_norm: bool = False
    sandwich: bool = False
    window: int | None = None


def applies(x: mx.array) -> bool:
    """Whether this forward (hidden states x) can run its layers as fused nodes: one request, one token."""
    return (
        x.ndim == 3
        and x.shape[0] == 1
        and x.shape[1] == 1
        and x.dtype == mx.float32
        and native.fused_layers()
    )


def run(block, x: mx.array, cache: object) -> mx.array | None:
    """The block's output for the token x (1, 1, hidden) as one native node, updating ``cache``; None when the
    block cannot take it (its cache is empty or batched, or a product is not affine): the caller runs its ops."""
    if isinstance(cache, BatchCache):
        if len(cache.caches) != 1:
            return None
        cache = cache.caches[0]
    if not isinstance(cache, KVCache | SlidingKVCache) or cache.offset == 0 or cache.keys is None:
        return None
    if cache.keys.dtype != mx.float32:
        return None
    return decode(block.fused_spec(), x, cache)


def decode(spec: LayerSpec, x: mx.array, cache: KVCache | SlidingKVCache) -> mx.array | None:
    """The layer's output for the token x (1, 1, hidden), updating ``cache``; None when a product is not affine."""
    weights: list[mx.array] = []
    gaussian: list[mx.array] = []
    bits: list[int] = []
    groups: list[int] = []
    gauss: list[bool] = []
    for lin in spec.linears:
        ops = getattr(lin, "fused_operands", lambda: None)()
        if ops is None:
            return None
        weights += [ops.wq, ops.scales, ops.biases]
        bits.append(ops.bits)
        groups.append(ops.group_size)
        gauss.append(ops.gaussian is not None)
        if ops.gaussian is not None:
            gaussian += ops.gaussian
    # room for the token: the node writes it into the buffer itself (decode_layer.h says why); a sliding
    # cache's buffer holds its stored keys at lo..hi, and the node reads only the last `window` of them
    cache.reserve(1, (1, spec.kv_heads, 1, spec.head_dim), spec.head_dim, mx.float32)
    sliding = isinstance(cache, SlidingKVCache)
    buf_k, buf_v = (cache.buf_k, cache.buf_v) if sliding else (cache.keys, cache.values)
    assert buf_k is not None and buf_v is not None
    h, _, _ = native.decode_layer(
        x, buf_k, buf_v, spec.norms, weights + gaussian, bits, groups, gauss=gauss,
        heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim, eps=spec.eps,
        rope_base=spec.rope_base, rope_scale=spec.rope_scale, attn_scale=spec.attn_scale, gelu=spec.gelu,
        qk_norm=spec.qk_norm, sandwich=spec.sandwich, position=cache.offset,
        cached=cache.hi if sliding else cache.offset, window=spec.window or 0, write_cache=True,
    )  # fmt: skip
    if sliding:
        cache.appended(1)
    else:
        cache.offset += 1
    return h
