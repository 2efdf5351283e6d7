"""Where a model argument points (built-in name, .gguf file, Hugging Face directory, FGS directory), and
reading a dense source model from it."""

from __future__ import annotations

import os
from pathlib import Path

from mmt_mlx.errors import ModelFormatError, ModelNotFoundError
from mmt_mlx.fgs.format import is_fgs_dir
from mmt_mlx.registry import DEFAULT_MODEL, builtin_path, canonical_name
from mmt_mlx.sources import SourceModel, load_gguf, load_hf_dir


def resolve_path(model: str | None) -> tuple[str, Path]:
    """(display name, path) of a model argument; built-in names are located (and assembled) on demand."""
    arg = model or DEFAULT_MODEL
    p = Path(os.path.expanduser(arg))
    if p.exists():
        return p.name, p
    if arg.endswith(".gguf") or os.sep in arg:
        raise ModelNotFoundError(f"model file or directory not found: {arg}")
    return canonical_name(arg), builtin_path(arg)


def read_source(path: Path) -> SourceModel:
    if is_fgs_dir(path):
        raise ModelFormatError(f"{path} is already an FGS model")
    if path.is_dir():
        return load_hf_dir(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        return load_gguf(path)
    raise ModelFormatError(f"{path}: not a GGUF file or a model directory")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_source(model: str | None) -> tuple[str, SourceModel]:
    """(display name, dense source model) of a model argument."""
    name, path = resolve_path(model)
    return name, read_source(path)
