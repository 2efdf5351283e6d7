"""Build a runnable MLX model: from dense weights (a ``SourceModel``) or from an FGS model directory's codes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx import native
from mmt_mlx.errors import ModelFormatError
from mmt_mlx.models import ARCHITECTURES
from mmt_mlx.sources import SourceModel
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
    try:
        args = module.ModelArgs(**config)
    except TypeError as e:  # a missing or unknown config key
        raise ModelFormatError(f"config does not fit the {arch} architecture ({e})") from None
    return module.Model(args)


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
    native.advise_hugepages(model)
    n_params = int(sum(v.size for v in src.weights.values()))
    info = {"format": src.meta.get("format", ""), "source_bytes": src.weight_bytes, "parameters": n_params}
    return LoadedModel(
        model, src.tokenizer, name, src.path, int(src.config["max_position_embeddings"]), src.arch, info
    )


def load_fgs(path: Path, name: str) -> LoadedModel:
    from mlx.utils import tree_flatten, tree_unflatten

    from mmt_mlx.fgs.format import load_fgs_model
    from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear

    manifest, codes, raw = load_fgs_model(path)
    model = build_model(manifest["arch"], manifest["config"])
    missing = {k for k, _ in tree_flatten(model.parameters())} - set(codes) - set(raw)
    if missing:  # a weight left at its initial value would run, and answer noise
        raise ModelFormatError(
            f"{path}: no code or tensor for {len(missing)} weights of the model (first: {min(missing)})"
        )
    replaced = []
    for mod_name, module in model.named_modules():
        code = codes.get(f"{mod_name}.weight")
        if code is None:
            continue
        if isinstance(module, nn.Embedding):
            replaced.append((mod_name, FGSEmbedding(code)))
        elif isinstance(module, nn.Linear):
            replaced.append((mod_name, FGSLinear(code)))
    if len(replaced) != len(codes):
        raise ModelFormatError(
            f"{path}: {len(codes) - len(replaced)} coded tensors match no layer of the model"
        )
    model.update_modules(tree_unflatten(replaced))
    dtype = compute_dtype()
    try:
        model.load_weights([(k, mx.array(v, dtype=dtype)) for k, v in raw.items()], strict=False)
    except ValueError as e:
        raise ModelFormatError(f"{path}: raw tensors do not match the model ({e})") from None
    mx.eval(model.parameters())
    native.advise_hugepages(model)
    tokenizer = _fgs_tokenizer(path, manifest["tokenizer"])
    report = manifest.get("report", {})
    info = {"format": "fgs", "stored_bytes": report.get("stored_bytes"), "source_bytes": report.get("source_bytes"),
            "parameters": report.get("parameters"), "tau": report.get("tau"), "preset": report.get("preset")}  # fmt: skip
    context = int(manifest["config"].get("max_position_embeddings", 2048))
    return LoadedModel(model, tokenizer, name, str(path), context, manifest["arch"], info)


def _fgs_tokenizer(path: Path, record: dict) -> Tokenizer:
    from types import SimpleNamespace

    from mmt_mlx.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_dir

    if record.get("kind") == "gguf-fields":
        fields = json.loads((path / record["file"]).read_text(encoding="utf-8"))
        for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            if key in fields:
                fields[key] = np.asarray(fields[key])
        return tokenizer_from_gguf(SimpleNamespace(fields=fields))
    return tokenizer_from_hf_dir(path)
