"""Reading model files (GGUF, Hugging Face directories) into plain float32 numpy weights.

The result, a ``SourceModel``, is what both the runtime (build an MLX model) and ``mmt convert`` (encode FGS
codes) start from. Weight names follow the Hugging Face layout without the ``model.`` prefix
(``layers.3.self_attn.q_proj.weight``) and every convention is normalised here, so the model code stays
file-agnostic: Llama Q/K rows un-permuted from GGUF's interleaved-RoPE order, Gemma norms stored as w
(GGUF stores 1 + w).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmt_mlx.errors import ModelFormatError
from mmt_mlx.gguf_file import GGUFFile
from mmt_mlx.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir

SUPPORTED = ("llama", "gemma3")


@dataclass
class SourceModel:
    arch: str  # "llama" | "gemma3"
    config: dict  # keyword arguments of the architecture's ModelArgs
    weights: dict[str, np.ndarray]
    tokenizer: Tokenizer
    path: str
    weight_bytes: int  # bytes the file stores for its tensors (compression ratios are measured against it)
    meta: dict = field(default_factory=dict)


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def _gguf_name(name: str, arch: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        layer, base, suffix = parts[1], parts[2], parts[3]
        if base == "ffn_norm":
            mapped = "post_attention_layernorm" if arch == "llama" else "pre_feedforward_layernorm"
        elif base in _GGUF_LAYER_NAMES:
            mapped = _GGUF_LAYER_NAMES[base]
        else:
            raise ModelFormatError(f"unexpected tensor {name!r} in GGUF file")
        return f"layers.{layer}.{mapped}.{suffix}"
    if parts[0] in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ModelFormatError(f"unexpected tensor {name!r} in GGUF file")


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF stores Llama Q/K rows in interleaved-pair order; restore the half-split (HF) order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def _gguf_config(reader, arch: str) -> dict:
    def g(key: str, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_heads = int(g("attention.head_count"))
    common = dict(
        hidden_size=int(g("embedding_length")),
        num_hidden_layers=int(g("block_count")),
        intermediate_size=int(g("feed_forward_length")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(g("attention.head_count_kv", n_heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(g("context_length", 2048)),
    )
    if arch == "llama":
        return dict(
            common,
            rope_theta=float(g("rope.freq_base", 10000.0)),
            head_dim=int(g("rope.dimension_count", 0)) or None,
        )
    head_dim = int(g("attention.key_length", 256))
    # Not in the GGUF; these are Gemma 3's fixed settings (local RoPE base, global layer every 6th, scalar).
    return dict(
        common,
        head_dim=head_dim,
        rope_theta=float(g("rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=10_000.0,
        sliding_window=int(g("attention.sliding_window", 512)),
        sliding_window_pattern=6,
        query_pre_attn_scalar=float(head_dim),
    )


def load_gguf(path: str | os.PathLike) -> SourceModel:
    path = str(path)
    reader = GGUFFile(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise ModelFormatError(
            f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED)})"
        )
    config = _gguf_config(reader, arch)
    weights: dict[str, np.ndarray] = {}
    stored = 0
    try:
        for t in reader.tensors:
            w = reader.dequantize(t)
            stored += t.n_bytes
            name = _gguf_name(t.name, arch)
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
                w = _unpermute_rope(w, heads)
            if arch == "gemma3" and name.endswith("norm.weight"):
                w = w - 1.0
            weights[name] = np.ascontiguousarray(w)
    except ModelFormatError:
        raise
    except Exception as e:
        raise ModelFormatError(f"{path}: corrupt tensor data ({type(e).__name__}: {e})") from None
    emb = weights.get("embed_tokens.weight")
    if emb is None:
        raise ModelFormatError(f"{path}: no token embedding tensor")
    config["vocab_size"] = int(emb.shape[0])
    if arch == "llama":
        config["tie_word_embeddings"] = "lm_head.weight" not in weights
    tokenizer = tokenizer_from_gguf(reader)
    tok_fields = {k: v for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    return SourceModel(
        arch, config, weights, tokenizer, path, stored, {"format": "gguf", "tokenizer_fields": tok_fields}
    )


_HF_ARCH = {"llama": "llama", "mistral": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def load_hf_dir(path: str | os.PathLike) -> SourceModel:
    from safetensors.numpy import load_file

    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise ModelFormatError(f"{root}: no config.json (expected a Hugging Face model directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = cfg.get("text_config", cfg) if cfg.get("model_type") == "gemma3" else cfg
    arch = _HF_ARCH.get(cfg.get("model_type", ""))
    if arch is None:
        raise ModelFormatError(f"{root}: unsupported architecture {cfg.get('model_type')!r}")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{root}: no *.safetensors weight files")
    weights: dict[str, np.ndarray] = {}
    stored = 0
    for f in files:
        try:
            tensors = _load_safetensors_f32(f, load_file)
        except Exception as e:
            raise ModelFormatError(f"{f}: unreadable safetensors file ({type(e).__name__}: {e})") from None
        stored += f.stat().st_size
        for name, w in tensors.items():
            for prefix in ("model.language_model.", "language_model.model.", "model."):
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    break
            weights[name] = w
    config = _hf_config(cfg, arch)
    if arch == "llama":
        config["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", "lm_head.weight" not in weights))
        if config["tie_word_embeddings"]:
            weights.pop("lm_head.weight", None)
    else:
        weights.pop("lm_head.weight", None)
    return SourceModel(
        arch, config, weights, tokenizer_from_hf_dir(root), str(root), stored, {"format": "hf"}
    )


def _load_safetensors_f32(path: Path, load_file) -> dict[str, np.ndarray]:
    try:
        return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    except TypeError:  # bfloat16 has no numpy dtype: go through MLX
        import mlx.core as mx

        return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path)).items()}


def _hf_config(cfg: dict, arch: str) -> dict:
    n_heads = cfg["num_attention_heads"]
    common = dict(
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        intermediate_size=cfg["intermediate_size"],
        num_attention_heads=n_heads,
        num_key_value_heads=cfg.get("num_key_value_heads", n_heads),
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
    )
    if arch == "llama":
        return dict(common, rope_theta=cfg.get("rope_theta", 10000.0), head_dim=cfg.get("head_dim"))
    return dict(
        common,
        head_dim=cfg.get("head_dim", 256),
        rope_theta=cfg.get("rope_theta", 1_000_000.0),
        rope_local_base_freq=cfg.get("rope_local_base_freq", 10_000.0),
        sliding_window=cfg.get("sliding_window", 512),
        sliding_window_pattern=cfg.get("sliding_window_pattern", 6),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
    )
