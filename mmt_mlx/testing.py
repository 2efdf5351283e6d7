"""Tiny random-weight models for tests and examples: real tokenizer, tiny shapes, deterministic weights."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.build import LoadedModel, build_model, compute_dtype
from mmt_mlx.models import ARCHITECTURES
from mmt_mlx.models.checkpoint import gguf_name
from mmt_mlx.registry import builtin_path

TINY_CONFIGS = {
    "llama": dict(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, rope_theta=10000.0, tie_word_embeddings=True,
        max_position_embeddings=256,
    ),
    "gemma3": dict(
        hidden_size=64, num_hidden_layers=6, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=49152, sliding_window=8, sliding_window_pattern=6,
        query_pre_attn_scalar=16.0, max_position_embeddings=256,
    ),
}  # fmt: skip

_tokenizer = None


def smollm2_tokenizer():
    """The real SmolLM2 tokenizer, read once from the installed GGUF's metadata."""
    global _tokenizer
    if _tokenizer is None:
        from mmt_mlx.tokenizer import tokenizer_from_gguf

        _tokenizer = tokenizer_from_gguf(builtin_path("smollm2-135m-instruct"))
    return _tokenizer


def random_weights(model: nn.Module, arch: str, seed: int) -> dict[str, np.ndarray]:
    """Deterministic small random weights; norm weights near identity (Gemma norms scale by 1 + w)."""
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    norm_centre = 0.0 if arch == "gemma3" else 1.0
    out = {}
    for name, p in tree_flatten(model.parameters()):
        if p.ndim == 1:
            out[name] = (norm_centre + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])).astype(np.float32)
    return out


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> LoadedModel:
    config = dict(TINY_CONFIGS[arch], **overrides)
    model = build_model(arch, config)
    weights = random_weights(model, arch, seed)
    model.load_weights([(k, mx.array(v, dtype=compute_dtype())) for k, v in weights.items()])
    mx.eval(model.parameters())
    return LoadedModel(
        model,
        smollm2_tokenizer(),
        f"tiny-{arch}",
        "",
        config["max_position_embeddings"],
        arch,
        {"format": "random", "parameters": int(sum(v.size for v in weights.values()))},
    )


def write_tiny_gguf(
    path: str, arch: str = "llama", seed: int = 0, architecture_name: str | None = None
) -> dict:
    """Write a real GGUF file (F32 tensors, SmolLM2's tokenizer metadata) of a tiny random model.

    Stored the way llama.cpp's converters store it: Llama Q/K rows permuted for interleaved RoPE, Gemma norms
    as 1 + w. Returns the HF-layout weights it encodes, to compare a loaded model against.
    """
    import gguf

    config = TINY_CONFIGS[arch]
    weights = random_weights(build_model(arch, config), arch, seed)
    src = gguf.GGUFReader(builtin_path("smollm2-135m-instruct"))
    name = architecture_name or arch
    w = gguf.GGUFWriter(path, name)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    if arch == "gemma3":
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
        w.add_sliding_window(config["sliding_window"])
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            if isinstance(value, list):
                w.add_array(key, value)
            elif isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, bool):
                w.add_bool(key, value)
            else:
                w.add_uint32(key, int(value))
    rules = ARCHITECTURES[arch]
    for hf_name, value in weights.items():
        out = rules.to_gguf(hf_name, value, config)
        w.add_tensor(gguf_name(hf_name, rules.GGUF_LAYER_NAMES), np.ascontiguousarray(out, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights
