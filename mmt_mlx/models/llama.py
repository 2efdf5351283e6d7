"""Llama-family decoder (SmolLM2, Llama 2/3, Mistral-style without sliding window)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.cache import BatchCache, KVCache
from mmt_mlx.models import fused_layer
from mmt_mlx.models.base import RMSNorm, RoPE, cached_attention, gated_activation
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
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        self.rope = RoPE(self.head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache: KVCache | BatchCache) -> mx.array:
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, length, self.n_kv, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, length, self.n_kv, -1).transpose(0, 2, 1, 3)
        return self.o_proj(cached_attention(q, k, v, cache, self.rope, self.scale))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache | BatchCache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def fused_spec(self) -> fused_layer.LayerSpec:
        """The layer as one native decode node takes it (item access: cheaper than nn.Module attributes)."""
        a, m = self["self_attn"], self["mlp"]
        return fused_layer.LayerSpec(
            norms=[self["input_layernorm"]["weight"], self["post_attention_layernorm"]["weight"]],
            linears=[a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"],
                     m["down_proj"]],
            heads=a.n_heads, kv_heads=a.n_kv, head_dim=a.head_dim, eps=self["input_layernorm"].eps,
            rope_base=a["rope"].base, rope_scale=a["rope"].scale, attn_scale=a.scale,
        )  # fmt: skip


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """(B, L) token ids -> (B, L, vocab) logits; ``cache`` from make_cache() carries earlier tokens."""
        cache = cache if cache is not None else self.make_cache()
        h = self.embed_tokens(tokens)
        fused = fused_layer.applies(h)
        for layer, c in zip(self.layers, cache):
            y = fused_layer.run(layer, h, c) if fused else None
            h = y if y is not None else layer(h, c)
        h = self.norm(h)
        if self.args.tie_word_embeddings:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]


# ---------------------------------------------------------------------------------------------- checkpoint rules
# How GGUF files and Hugging Face directories store this architecture (read by ``mmt_mlx.sources``).

HF_MODEL_TYPES = ("llama", "mistral")
GGUF_LAYER_NAMES = {**COMMON_GGUF_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"}


def config_from_gguf(get: GGUFGetter) -> dict:
    return dict(
        common_gguf_config(get),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        head_dim=int(get("rope.dimension_count", 0)) or None,
    )


def config_from_hf(cfg: dict) -> dict:
    return dict(
        common_hf_config(cfg), rope_theta=cfg.get("rope_theta", 10000.0), head_dim=cfg.get("head_dim")
    )


def _rope_heads(name: str, config: dict) -> int | None:
    if name.endswith("q_proj.weight"):
        return config["num_attention_heads"]
    if name.endswith("k_proj.weight"):
        return config["num_key_value_heads"]
    return None


def from_gguf(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """GGUF stores Q/K rows in interleaved-pair (traditional RoPE) order; restore the half-split (HF) order."""
    heads = _rope_heads(name, config)
    if heads is None:
        return w
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def to_gguf(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """The inverse of ``from_gguf`` (what llama.cpp's converter does)."""
    heads = _rope_heads(name, config)
    if heads is None:
        return w
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def tie_embeddings(config: dict, weights: dict[str, np.ndarray], declared: bool | None = None) -> None:
    """Untied when the checkpoint has its own LM head (or its config says so); a tied head is dropped."""
    tied = ("lm_head.weight" not in weights) if declared is None else bool(declared)
    config["tie_word_embeddings"] = tied
    if tied:
        weights.pop("lm_head.weight", None)
