"""The FGS model format: a directory with ``manifest.json`` and ``codes.safetensors`` (no pickle).

manifest.json
    format: "mmt-fgs", format_version, arch, config (the architecture's ModelArgs), tokenizer (how to rebuild
    it: the source GGUF's tokenizer metadata in ``tokenizer.json``, or the Hugging Face tokenizer files copied
    beside it), tensors: {name: {"shape", "tau", "errors", "levels": [{"kind", params..., "arrays": {field:
    {"key", "shape", "dtype", "crc32"}}}]}} for coded tensors, raw: {name: array entry} for small tensors
    (norms) stored as they are, report: what ``mmt convert`` measured.

Loading checks every array against the manifest (present, shape, dtype, CRC-32), so a truncated, corrupted or
mismatched file fails with an error naming the file and the tensor. Writing goes to a temporary directory that
is renamed into place at the end, so an interrupted conversion leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mmt_mlx.errors import ModelFormatError
from mmt_mlx.fgs.codes import (
    CirculantCode,
    GaussianCode,
    Level,
    MetaCode,
    QuantCode,
    RotQCode,
    TensorCode,
    level_shape,
    row_bands,
)

FORMAT = "mmt-fgs"
FORMAT_VERSION = 2  # what is written; 2 added the rotq level's log-scale codes (``row_scale``)
TRELLIS_VERSION = 3  # written instead where a rotq level is trellis-coded (older readers refuse it cleanly)
ROW_BANDS_VERSION = 4  # written where a tensor is coded by row bands (``RotQCode.row_mask``)
READABLE_VERSIONS = (1, 2, 3, 4)
MANIFEST = "manifest.json"
CODES = "codes.safetensors"

_FIELDS = {
    "gaussian": ("mu", "sidx", "perm"),
    "circulant": ("spec_re", "spec_im"),
    "quant": ("wq", "scales", "biases"),
    "rotq": ("codebook", "wq", "scales", "row_scale", "row_mask"),
}
_PARAMS = {
    "gaussian": ("rows", "cols", "sigma_grid"),
    "circulant": ("rows", "cols", "block"),
    "quant": ("rows", "cols", "bits", "group_size"),
    "rotq": ("rows", "cols", "bits", "group_size", "seed"),
}


def is_fgs_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


class _Writer:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, key: str, a: np.ndarray) -> dict:
        a = np.ascontiguousarray(a)
        self.arrays[key] = a
        return {"key": key, "shape": list(a.shape), "dtype": str(a.dtype), "crc32": zlib.crc32(a.tobytes())}


def _level_entry(w: _Writer, prefix: str, lv: Level) -> dict:
    entry: dict[str, Any] = {"kind": lv.kind}
    entry.update({p: getattr(lv, p) for p in _PARAMS[lv.kind]})
    if isinstance(lv, RotQCode) and lv.trellis:
        entry["trellis"] = lv.trellis
    if isinstance(lv, RotQCode) and lv.row_mask is not None:
        entry["tensor_rows"] = lv.tensor_rows
    arrays = {}
    for f in _FIELDS[lv.kind]:
        value = getattr(lv, f)
        if value is not None:
            arrays[f] = w.put(f"{prefix}.{f}", value)
    if isinstance(lv, GaussianCode):
        if isinstance(lv.amp, MetaCode):
            m = lv.amp
            entry["amp_meta"] = {"method": m.method, "rows": m.rows, "cols": m.cols}
            arrays.update({f"amp_meta.{k}": w.put(f"{prefix}.amp_meta.{k}", v) for k, v in m.arrays.items()})
        else:
            arrays["amp"] = w.put(f"{prefix}.amp", lv.amp)
    entry["arrays"] = arrays
    return entry


def save_fgs_model(
    out: str | os.PathLike,
    *,
    arch: str,
    config: dict,
    codes: dict[str, TensorCode],
    raw: dict[str, np.ndarray],
    tokenizer: dict,
    tokenizer_files: dict[str, bytes],
    report: dict,
    overwrite: bool = False,
) -> Path:
    """Write atomically: everything goes to a temporary sibling directory, renamed into place at the end."""
    from safetensors.numpy import save_file

    out = Path(out)
    if out.exists() and not (overwrite and is_fgs_dir(out)):
        what = "an FGS model (pass --force to replace it)" if is_fgs_dir(out) else "not an FGS model"
        raise ModelFormatError(f"{out} already exists and is {what}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        w = _Writer()
        tensors = {}
        for name, tc in codes.items():
            levels = [_level_entry(w, f"{name}/{i}", lv) for i, lv in enumerate(tc.levels)]
            tensors[name] = {"shape": list(tc.shape), "tau": tc.tau, "errors": tc.errors, "levels": levels}
        raw_entries = {name: w.put(f"raw/{name}", a) for name, a in raw.items()}
        save_file(w.arrays, str(tmp / CODES))
        for fname, data in tokenizer_files.items():
            (tmp / fname).write_bytes(data)
        every = [lv for tc in codes.values() for lv in tc.levels]
        version = FORMAT_VERSION
        if any(getattr(lv, "row_mask", None) is not None for lv in every):
            version = ROW_BANDS_VERSION
        elif any(getattr(lv, "trellis", 0) for lv in every):
            version = TRELLIS_VERSION
        manifest = {
            "format": FORMAT, "format_version": version, "arch": arch, "config": config,
            "tokenizer": tokenizer, "tensors": tensors, "raw": raw_entries, "report": report,
        }  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _array(arrays, entry: dict, where: str) -> np.ndarray:
    a = arrays.get(entry["key"])
    if a is None:
        raise ModelFormatError(f"{where}: array {entry['key']!r} is missing")
    if list(a.shape) != entry["shape"] or str(a.dtype) != entry["dtype"]:
        raise ModelFormatError(
            f"{where}: array {entry['key']!r} is {a.dtype}{list(a.shape)}, manifest says {entry['dtype']}{entry['shape']}"
        )
    if zlib.crc32(np.ascontiguousarray(a).tobytes()) != entry["crc32"]:
        raise ModelFormatError(f"{where}: array {entry['key']!r} is corrupted (CRC-32 mismatch)")
    return a


def _level(arrays, e: dict, where: str) -> Level:
    kind = e.get("kind")
    if kind not in _FIELDS:
        raise ModelFormatError(f"{where}: unknown level kind {kind!r}")
    got = {k: _array(arrays, v, where) for k, v in e["arrays"].items()}
    params = {p: e[p] for p in _PARAMS[kind]}
    if kind == "quant":
        return QuantCode(**params, wq=got["wq"], scales=got["scales"], biases=got["biases"])
    if kind == "rotq":
        trellis = e.get("trellis", 0)
        if trellis not in (0, 2):
            raise ModelFormatError(f"{where}: unknown trellis {trellis!r} (this mmt reads 0 and 2)")
        return RotQCode(**params, codebook=got["codebook"], wq=got["wq"], scales=got["scales"],
                        row_scale=got.get("row_scale"), trellis=trellis, row_mask=got.get("row_mask"),
                        tensor_rows=int(e.get("tensor_rows", 0)))  # fmt: skip
    if kind == "circulant":
        return CirculantCode(**params, spec_re=got["spec_re"], spec_im=got["spec_im"])
    if "amp_meta" in e:
        m = e["amp_meta"]
        parts = {k.split(".", 1)[1]: v for k, v in got.items() if k.startswith("amp_meta.")}
        amp: np.ndarray | MetaCode = MetaCode(m["method"], m["rows"], m["cols"], parts)
    else:
        amp = got["amp"]
    return GaussianCode(**params, amp=amp, mu=got["mu"], sidx=got["sidx"], perm=got.get("perm"))


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of an FGS model directory, checked for its format and version (arrays not read)."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{file}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFormatError(f"{file}: not an FGS model manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ModelFormatError(
            f"{file}: format version {version!r} (this mmt reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    for key, kind in (("arch", str), ("config", dict), ("tokenizer", dict), ("tensors", dict), ("raw", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ModelFormatError(f"{file}: malformed manifest ({key!r} missing or not a {kind.__name__})")
    return manifest


def load_fgs_model(path: str | os.PathLike) -> tuple[dict, dict[str, TensorCode], dict[str, np.ndarray]]:
    """(manifest, codes, raw tensors) of an FGS model directory, every array checked against the manifest."""
    from safetensors.numpy import load_file

    root = Path(path)
    manifest = read_manifest(root)
    try:
        arrays = load_file(str(root / CODES))
    except Exception as e:  # safetensors raises its own error types on truncated/invalid headers
        raise ModelFormatError(f"{root / CODES}: unreadable ({type(e).__name__}: {e})") from None
    codes = {}
    try:
        for name, t in manifest["tensors"].items():
            where = f"{root / CODES}, tensor {name}"
            levels = [_level(arrays, e, where) for e in t["levels"]]
            for lv in levels:
                if list(level_shape(lv)) != t["shape"]:
                    raise ModelFormatError(
                        f"{where}: level shape {list(level_shape(lv))} != tensor shape {t['shape']}"
                    )
            try:
                row_bands(levels, t["shape"][0])
            except ValueError as e:
                raise ModelFormatError(f"{where}: {e}") from None
            codes[name] = TensorCode(tuple(t["shape"]), levels, t.get("errors", []), t.get("tau"))
        raw = {
            name: _array(arrays, e, f"{root / CODES}, tensor {name}") for name, e in manifest["raw"].items()
        }
    except (KeyError, TypeError) as e:
        raise ModelFormatError(f"{root / MANIFEST}: malformed manifest ({type(e).__name__}: {e})") from None
    return manifest, codes, raw
