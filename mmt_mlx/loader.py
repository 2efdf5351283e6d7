"""``load_model``: turn a model argument (built-in name, .gguf file, Hugging Face directory, FGS model) into a
ready model. Built-in names load as FGS models (converted once at the default preset, see ``fgs_cache``)
unless ``dense``; FGS directories load their codes; .gguf files and Hugging Face directories load dense."""

from __future__ import annotations

from mmt_mlx.build import LoadedModel, load_fgs, model_from_source
from mmt_mlx.fgs.format import is_fgs_dir
from mmt_mlx.fgs_cache import fgs_model_path
from mmt_mlx.locate import read_source, resolve_path
from mmt_mlx.registry import BUILTINS


def load_model(model: str | None = None, *, dense: bool = False, progress: bool = True) -> LoadedModel:
    name, path = resolve_path(model)
    if is_fgs_dir(path):
        return load_fgs(path, name)
    if not dense and name in BUILTINS:
        return load_fgs(fgs_model_path(name, progress=progress)[1], name)
    return model_from_source(read_source(path), name)
