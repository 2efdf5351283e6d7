"""Reading model files (GGUF, Hugging Face directories) into plain float32 numpy weights.

The result, a ``SourceModel``, is what both the runtime (build an MLX model) and ``mmt convert`` (encode FGS
codes) start from. Weight names follow the Hugging Face layout without the ``model.`` prefix
(``layers.3.self_attn.q_proj.weight``) and every convention is normalised here, so the model code stays
file-agnostic. Each architecture's names, config keys and quirks (Llama Q/K rows un-permuted from GGUF's
interleaved-RoPE order, Gemma norms stored as w where GGUF stores 1 + w) live beside its model in
``mmt_mlx/models/``; this module only reads the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmt_mlx.errors import ModelFormatError
from mmt_mlx.gguf_file import GGUFFile
from mmt_mlx.models import ARCHITECTURES, HF_MODEL_TYPES
from mmt_mlx.models.checkpoint import hf_name
from mmt_mlx.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir


@dataclass
class SourceModel:
    arch: str  # a key of mmt_mlx.models.ARCHITECTURES
    config: dict  # keyword arguments of the architecture's ModelArgs
    weights: dict[str, np.ndarray]
    tokenizer: Tokenizer
    path: str
    weight_bytes: int  # bytes the file stores for its tensors (compression ratios are measured against it)
    meta: dict = field(default_factory=dict)


def _field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def load_gguf(path: str | os.PathLike) -> SourceModel:
    path = str(path)
    reader = GGUFFile(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelFormatError(
            f"{path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    rules = ARCHITECTURES[arch]
    config = rules.config_from_gguf(lambda key, default: _field(reader, f"{arch}.{key}", default))
    weights: dict[str, np.ndarray] = {}
    stored = 0
    try:
        for t in reader.tensors:
            w = reader.dequantize(t)
            stored += t.n_bytes
            name = hf_name(t.name, rules.GGUF_LAYER_NAMES)
            weights[name] = np.ascontiguousarray(rules.from_gguf(name, w, config))
    except ModelFormatError:
        raise
    except Exception as e:
        raise ModelFormatError(f"{path}: corrupt tensor data ({type(e).__name__}: {e})") from None
    emb = weights.get("embed_tokens.weight")
    if emb is None:
        raise ModelFormatError(f"{path}: no token embedding tensor")
    config["vocab_size"] = int(emb.shape[0])
    rules.tie_embeddings(config, weights)
    tokenizer = tokenizer_from_gguf(reader)
    tok_fields = {k: v for k, v in reader.fields.items() if k.startswith("tokenizer.")}
    return SourceModel(
        arch, config, weights, tokenizer, path, stored, {"format": "gguf", "tokenizer_fields": tok_fields}
    )


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
    arch = HF_MODEL_TYPES.get(cfg.get("model_type", ""))
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
    rules = ARCHITECTURES[arch]
    config = rules.config_from_hf(cfg)
    rules.tie_embeddings(config, weights, cfg.get("tie_word_embeddings"))
    return SourceModel(
        arch, config, weights, tokenizer_from_hf_dir(root), str(root), stored, {"format": "hf"}
    )


def _load_safetensors_f32(path: Path, load_file) -> dict[str, np.ndarray]:
    try:
        return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    except TypeError:  # bfloat16 has no numpy dtype: go through MLX
        import mlx.core as mx

        return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path)).items()}
