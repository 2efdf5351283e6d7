"""The cache of FGS conversions: where the FGS model of a model argument at a preset lives, converted on
first use. The only place the runtime reaches the converter.

Keys: a built-in by its name; a file or directory by its absolute path, size and modification time. Every key
also names the preset, its tau and the FGS format version, so a retuned preset or a new format misses the cache.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from mmt_mlx.convert import DEFAULT_PRESET, PRESETS, convert
from mmt_mlx.errors import MmtError
from mmt_mlx.fgs.format import FORMAT_VERSION, is_fgs_dir
from mmt_mlx.locate import read_source, resolve_path
from mmt_mlx.registry import BUILTINS, cache_dir
from mmt_mlx.sources import SourceModel


def cache_entry(key: str, preset: str) -> Path:
    """The cache directory of one conversion (it may not exist yet)."""
    return cache_dir() / "fgs" / f"{key}-{preset}-tau{PRESETS[preset]:g}-v{FORMAT_VERSION}"


def source_key(name: str, path: Path) -> str:
    """The cache key of a model's source: a built-in's name, or a file's path, size and mtime."""
    if name in BUILTINS:
        return name
    st = path.stat()
    h = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{path.stem}-{h}"


def fgs_model_path(
    model_arg: str | None, preset: str | None = None, src: SourceModel | None = None, progress: bool = True
) -> tuple[str, Path]:
    """(name, FGS directory) of a model argument at a preset, converting once into the cache.

    FGS directories are returned as they are. ``src``, when the caller already read the source, saves
    reading it again.
    """
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise MmtError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    name, path = resolve_path(model_arg)
    if is_fgs_dir(path):
        return name, path
    out = cache_entry(source_key(name, path), preset)
    if not is_fgs_dir(out):
        print(f"converting {name} to FGS codes (preset {preset}); this happens once, cached in {out}",
              file=sys.stderr)  # fmt: skip
        convert(src if src is not None else read_source(path), out, preset=preset, progress=progress,
                source_name=name, overwrite=True)  # fmt: skip
    return name, out
