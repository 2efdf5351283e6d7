"""Turn a model argument (built-in name, .gguf file, Hugging Face directory, FGS model) into a ready model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.errors import ModelFormatError, ModelNotFoundError
from mmt_mlx.models import ARCHITECTURES
from mmt_mlx.registry import DEFAULT_MODEL, builtin_path, canonical_name
from mmt_mlx.sources import SourceModel, load_gguf, load_hf_dir
from mmt_mlx.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    name: str
    path: str
    context_length: int
    arch: str = ""
    info: dict = field(default_factory=dict)  # format, stored bytes, ... (for reports and the bench)


def compute_dtype() -> mx.Dtype:
    """f32 on CPU (f16/bf16 matmuls run ~2 GFLOP/s on Linux CPU), bf16 on GPUs."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def build_model(arch: str, config: dict) -> nn.Module:
    module = ARCHITECTURES.get(arch)
    if module is None:
        raise ModelFormatError(f"unsupported architecture {arch!r}")
    return module.Model(module.ModelArgs(**config))


def model_from_source(src: SourceModel, name: str) -> LoadedModel:
    model = build_model(src.arch, src.config)
    dtype = compute_dtype()
    try:
        model.load_weights([(k, mx.array(v, dtype=dtype)) for k, v in src.weights.items()], strict=True)
    except ValueError as e:
        raise ModelFormatError(
            f"{src.path}: weights do not match the {src.arch} architecture ({e})"
        ) from None
    mx.eval(model.parameters())
    n_params = int(sum(v.size for v in src.weights.values()))
    info = {"format": src.meta.get("format", ""), "source_bytes": src.weight_bytes, "parameters": n_params}
    return LoadedModel(
        model, src.tokenizer, name, src.path, int(src.config["max_position_embeddings"]), src.arch, info
    )


def resolve_path(model: str | None) -> tuple[str, Path]:
    """(display name, path) of a model argument; built-in names are located (and assembled) on demand."""
    arg = model or DEFAULT_MODEL
    p = Path(os.path.expanduser(arg))
    if p.exists():
        return p.name, p
    if arg.endswith(".gguf") or os.sep in arg:
        raise ModelNotFoundError(f"model file or directory not found: {arg}")
    return canonical_name(arg), builtin_path(arg)


def load_source(model: str | None) -> tuple[str, SourceModel]:
    name, path = resolve_path(model)
    if path.is_dir():
        return name, load_hf_dir(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        return name, load_gguf(path)
    raise ModelFormatError(f"{path}: not a GGUF file or a model directory")


def load_model(model: str | None = None, *, dense: bool = False) -> LoadedModel:
    name, src = load_source(model)
    lm = model_from_source(src, name)
    np.random.seed(None)
    return lm


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
