"""The evaluation text and memory hygiene between models, shared by every evaluation."""

from __future__ import annotations

import gc
from pathlib import Path

import mlx.core as mx

from mmt_mlx.errors import MmtError


def read_text(path: str, start: str | None = None) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise MmtError(f"cannot read text file {path}: {e.strerror}") from None
    if start:
        i = text.find(start)
        if i < 0:
            raise MmtError(f"{path}: start marker {start!r} not found")
        text = text[i:]
    if not text.strip():
        raise MmtError(f"{path}: the text is empty")
    return text


def free_memory() -> None:
    """Drop MLX's buffer cache so the next model's peak memory is its own."""
    gc.collect()
    mx.clear_cache()
