"""What every architecture's checkpoint rules share: the GGUF tensor names common to llama.cpp's decoders
(mapped to the Hugging Face layout without the ``model.`` prefix) and the config keys every decoder has.
Each architecture module adds its own names, config keys and quirks beside its model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmt_mlx.errors import ModelFormatError

COMMON_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
GGUF_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}

GGUFGetter = Callable[[str, Any], Any]  # (key without the "<arch>." prefix, default) -> value


def hf_name(gguf_name: str, layer_names: dict[str, str]) -> str:
    """'blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight' with an architecture's layer names."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in layer_names:
        return f"layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    if parts[0] in GGUF_TOP_NAMES and len(parts) == 2:
        return f"{GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ModelFormatError(f"unexpected tensor {gguf_name!r} in GGUF file")


def gguf_name(name: str, layer_names: dict[str, str]) -> str:
    """The inverse of ``hf_name`` (writing GGUF files)."""
    inverse_layer = {v: k for k, v in layer_names.items()}
    inverse_top = {v: k for k, v in GGUF_TOP_NAMES.items()}
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{layer}.{inverse_layer[module]}.{suffix}"
    module, suffix = name.rsplit(".", 1)
    return f"{inverse_top[module]}.{suffix}"


def common_gguf_config(get: GGUFGetter) -> dict:
    n_heads = int(get("attention.head_count", None))
    return dict(
        hidden_size=int(get("embedding_length", None)),
        num_hidden_layers=int(get("block_count", None)),
        intermediate_size=int(get("feed_forward_length", None)),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", None)),
        max_position_embeddings=int(get("context_length", 2048)),
    )


def common_hf_config(cfg: dict) -> dict:
    n_heads = cfg["num_attention_heads"]
    return dict(
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        intermediate_size=cfg["intermediate_size"],
        num_attention_heads=n_heads,
        num_key_value_heads=cfg.get("num_key_value_heads", n_heads),
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
    )
