"""Gemma 3 text decoder: interleaved sliding-window and global attention, q/k norms, GeGLU, tied embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.cache import BatchCache, KVCache, SlidingKVCache
from mmt_mlx.models import fused_layer
from mmt_mlx.models.base import RoPE, cached_attention, gated_activation, rms_norm
from mmt_mlx.models.checkpoint import (
    COMMON_GGUF_LAYER_NAMES,
    GGUFGetter,
    common_gguf_config,
    common_hf_config,
)


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding-window layers
    sliding_window: int = 512
    sliding_window_pattern: int = 6  # every 6th layer is global
    query_pre_attn_scalar: float = 256.0
    max_position_embeddings: int = 32768
    model_type: str = "gemma3"

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.sliding_window_pattern == 0


class _PlusOne:
    """1 + w of the weight last seen (a plain object: nn.Module does not count it as a parameter)."""

    src: mx.array | None = None
    value: mx.array | None = None


class RMSNorm(nn.Module):
    """Gemma's norm scales by (1 + weight); weights are stored as w, like Hugging Face checkpoints."""

    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps
        self._plus_one = _PlusOne()

    def multiplier(self) -> mx.array:
        """1 + weight, computed once per weight array (not one add node per call)."""
        p, w = self._plus_one, self["weight"]
        if p.src is not w:
            p.src, p.value = w, 1.0 + w
        assert p.value is not None
        return p.value

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.multiplier(), self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.scale = args.query_pre_attn_scalar**-0.5
        self.window = None if args.is_global(layer) else args.sliding_window
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        base = args.rope_theta if self.window is None else args.rope_local_base_freq
        self.rope = RoPE(self.head_dim, traditional=False, base=base)

    def __call__(self, x: mx.array, cache: KVCache | SlidingKVCache | BatchCache) -> mx.array:
        b, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, length, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(b, length, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, length, self.n_kv, -1).transpose(0, 2, 1, 3)
        return self.o_proj(cached_attention(q, k, v, cache, self.rope, self.scale, self.window))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), gelu=True))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        eps = args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps)

    def __call__(self, x: mx.array, cache: KVCache | SlidingKVCache | BatchCache) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

    def fused_spec(self) -> fused_layer.LayerSpec:
        """The layer as one native decode node takes it (item access: cheaper than nn.Module attributes)."""
        a, m = self["self_attn"], self["mlp"]
        norms = [self["input_layernorm"], a["q_norm"], a["k_norm"], self["post_attention_layernorm"],
                 self["pre_feedforward_layernorm"], self["post_feedforward_layernorm"]]  # fmt: skip
        return fused_layer.LayerSpec(
            norms=[n.multiplier() for n in norms],
            linears=[a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"],
                     m["down_proj"]],
            heads=a.n_heads, kv_heads=a.n_kv, head_dim=a.head_dim, eps=norms[0].eps,
            rope_base=a["rope"].base, rope_scale=a["rope"].scale, attn_scale=a.scale,
            gelu=True, qk_norm=True, sandwich=True, window=a.window,
        )  # fmt: skip


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        cache = cache if cache is not None else self.make_cache()
        h = self.embed_tokens(tokens)
        h = h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)
        fused = fused_layer.applies(h)
        for layer, c in zip(self.layers, cache):
            y = fused_layer.run(layer, h, c) if fused else None
            h = y if y is not None else layer(h, c)
        return self.embed_tokens.as_linear(self.norm(h))

    def make_cache(self) -> list:
        a = self.args
        return [
            KVCache() if a.is_global(i) else SlidingKVCache(a.sliding_window)
            for i in range(a.num_hidden_layers)
        ]


# ---------------------------------------------------------------------------------------------- checkpoint rules
# How GGUF files and Hugging Face directories store this architecture (read by ``mmt_mlx.sources``).

HF_MODEL_TYPES = ("gemma3_text", "gemma3")
GGUF_LAYER_NAMES = {
    **COMMON_GGUF_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def config_from_gguf(get: GGUFGetter) -> dict:
    head_dim = int(get("attention.key_length", 256))
    # Not in the GGUF; these are Gemma 3's fixed settings (local RoPE base, global layer every 6th, scalar).
    return dict(
        common_gguf_config(get),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=10_000.0,
        sliding_window=int(get("attention.sliding_window", 512)),
        sliding_window_pattern=6,
        query_pre_attn_scalar=float(head_dim),
    )


def config_from_hf(cfg: dict) -> dict:
    cfg = cfg.get("text_config", cfg)  # the multimodal checkpoints nest the decoder's config
    return dict(
        common_hf_config(cfg),
        head_dim=cfg.get("head_dim", 256),
        rope_theta=cfg.get("rope_theta", 1_000_000.0),
        rope_local_base_freq=cfg.get("rope_local_base_freq", 10_000.0),
        sliding_window=cfg.get("sliding_window", 512),
        sliding_window_pattern=cfg.get("sliding_window_pattern", 6),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
    )


def from_gguf(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """GGUF stores RMSNorm weights as 1 + w; the model (like Hugging Face) holds w."""
    return w - 1.0 if name.endswith("norm.weight") else w


def to_gguf(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    return w + 1.0 if name.endswith("norm.weight") else w


def tie_embeddings(config: dict, weights: dict[str, np.ndarray], declared: bool | None = None) -> None:
    """Gemma 3 always ties the LM head to the embedding table."""
    weights.pop("lm_head.weight", None)
