"""``mmt convert``: encode every weight matrix of a model as FGS codes and write an FGS model directory.

Calibration: a short text (shipped with the package) runs through the dense model once; the mean square of
every linear layer's input per column weights the planner's error, because what must survive is ``W x``, not
``W`` itself. The tied embedding table is weighted by the LM head's inputs.
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.build import model_from_source
from mmt_mlx.errors import MmtError
from mmt_mlx.fgs.codec import code_nbytes
from mmt_mlx.fgs.codes import TensorCode
from mmt_mlx.fgs.encoders.planner import KINDS, plan_tensor
from mmt_mlx.fgs.format import save_fgs_model
from mmt_mlx.recorder import InputRecorder
from mmt_mlx.sources import SourceModel

# tau = relative (activation-weighted) squared error per tensor. Measured perplexities are in the README.
PRESETS = {
    "near-lossless": 1e-4,
    "high": 4e-4,
    "default": 1e-3,
    "small": 4e-3,
    "smallest": 1.5e-2,
    "tiny": 3e-2,
}
# planner options of the presets below 4 bits: each quant group's grid is searched (min/max loses too much there)
# and 2-bit codes are ruled out (they cost far more perplexity than they save; README). The other presets keep
# min/max, which reproduces Q4_1-style sources exactly.
PRESET_OPTIONS = {"tiny": {"grid_search": True, "bits": (3, 4, 5, 6, 8)}}
DEFAULT_PRESET = "default"
CALIBRATION_TOKENS = 1024


def calibration_text() -> str:
    return resources.files("mmt_mlx").joinpath("data/calibration.txt").read_text(encoding="utf-8")


class _Recorder(InputRecorder):
    """Accumulates the mean square of a layer's inputs per column."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.sq: mx.array | None = None
        self.n = 0

    def _record(self, x: mx.array) -> None:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        s = mx.sum(flat * flat, axis=0)
        self.sq = s if self.sq is None else self.sq + s
        self.n += flat.shape[0]


def column_weights(model: nn.Module, tokens: list[int], chunk: int = 512) -> dict[str, np.ndarray]:
    """sqrt(mean x_j^2) of the inputs of every linear layer (and the tied head), keyed by weight name."""
    from mlx.utils import tree_unflatten

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    recorders = {n: _Recorder(m) for n, m in targets}
    model.update_modules(tree_unflatten(list(recorders.items())))
    try:
        for start in range(0, len(tokens), chunk):
            model(mx.array(tokens[start : start + chunk])[None], model.make_cache())
            mx.eval([r.sq for r in recorders.values() if r.sq is not None])
    finally:
        model.update_modules(tree_unflatten([(n, r.inner) for n, r in recorders.items()]))
    out = {}
    for name, r in recorders.items():
        if r.sq is None:
            continue
        w = np.sqrt(np.asarray(r.sq, dtype=np.float64) / max(r.n, 1))
        out[f"{name}.weight"] = np.maximum(w, 1e-3 * w.max() + 1e-12).astype(np.float32)  # no column ignored
    return out


def tensor_class(name: str) -> str:
    """'layers.3.self_attn.q_proj.weight' -> 'self_attn.q_proj' (the row of the report table)."""
    parts = name.split(".")
    return ".".join(parts[2:-1]) if parts[0] == "layers" else ".".join(parts[:-1])


def _tokenizer_record(src: SourceModel) -> tuple[dict, dict[str, bytes]]:
    if "tokenizer_fields" in src.meta:
        fields = {
            k: (v.tolist() if isinstance(v, np.ndarray) else v)
            for k, v in src.meta["tokenizer_fields"].items()
        }
        return {"kind": "gguf-fields", "file": "tokenizer_gguf.json"}, {
            "tokenizer_gguf.json": json.dumps(fields, ensure_ascii=False).encode()
        }
    root = Path(src.meta["tokenizer_dir"])
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
             "generation_config.json", "special_tokens_map.json")  # fmt: skip
    files = {n: (root / n).read_bytes() for n in names if (root / n).exists()}
    return {"kind": "hf-files"}, files


def convert(
    src: SourceModel,
    out: str | os.PathLike,
    *,
    tau: float | None = None,
    preset: str | None = None,
    calibrate: bool = True,
    allowed: frozenset[str] = KINDS,
    overwrite: bool = False,
    progress: bool = True,
    source_name: str = "",
    grid_search: bool | None = None,
) -> dict:
    """Plan and encode every 2-D weight of ``src``; write the FGS model; return the report."""
    if tau is None:
        if (preset or DEFAULT_PRESET) not in PRESETS:
            raise MmtError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        tau = PRESETS[preset or DEFAULT_PRESET]
    if not 0 < tau < 1:
        raise MmtError("--tau must be in (0, 1)")
    options = dict(PRESET_OPTIONS.get(preset or "", {}))
    if grid_search is not None:
        options["grid_search"] = grid_search
    t0 = time.perf_counter()
    weights_by_col: dict[str, np.ndarray] = {}
    if calibrate:
        lm = model_from_source(src, source_name or "source")
        ids = lm.tokenizer.encode(calibration_text(), add_bos=True)[:CALIBRATION_TOKENS]
        weights_by_col = column_weights(lm.model, ids)
        del lm
    t_cal = time.perf_counter() - t0
    matrices = {k: v for k, v in src.weights.items() if v.ndim == 2}
    raw = {k: v for k, v in src.weights.items() if v.ndim != 2}
    codes: dict[str, TensorCode] = {}
    from tqdm import tqdm

    bar = tqdm(matrices.items(), desc="encoding", unit="tensor", disable=not progress, leave=False)
    for name, w in bar:
        bar.set_postfix_str(name, refresh=False)
        codes[name] = plan_tensor(w, tau, weights_by_col.get(name), allowed, **options)
    report = build_report(src, codes, raw, tau, preset, time.perf_counter() - t0, t_cal, source_name)
    report["grid_search"] = bool(options.get("grid_search", False))
    _write(src, out, codes, raw, report, overwrite)
    return report


def convert_bpw(
    src: SourceModel,
    out: str | os.PathLike,
    bpw: float,
    *,
    overwrite: bool = False,
    progress: bool = True,
    source_name: str = "",
    preset: str | None = None,
    **options,
) -> dict:
    """Rotated Gaussian codes at <= ``bpw`` bits per stored weight (``rotq_convert``); write; return the report."""
    from mmt_mlx.rotq_convert import encode_bpw

    codes, raw, report = encode_bpw(
        src, bpw, progress=progress, source_name=source_name, preset=preset, **options
    )
    _write(src, out, codes, raw, report, overwrite)
    return report


def _write(src: SourceModel, out, codes: dict, raw: dict, report: dict, overwrite: bool) -> None:
    tok, tok_files = _tokenizer_record(src)
    save_fgs_model(
        out, arch=src.arch, config=src.config, codes=codes, raw=raw, tokenizer=tok, tokenizer_files=tok_files,
        report=report, overwrite=overwrite,
    )  # fmt: skip


def build_report(src, codes, raw, tau, preset, seconds, calib_seconds, source_name) -> dict:
    classes: dict[str, dict] = {}
    for name, tc in codes.items():
        c = classes.setdefault(
            tensor_class(name), {"tensors": 0, "params": 0, "bytes": 0, "levels": {}, "r2": {}}
        )
        c["tensors"] += 1
        c["params"] += int(np.prod(tc.shape))
        prev = 1.0
        for lv, err in zip(tc.levels, tc.errors or [None] * len(tc.levels)):
            key = lv.kind if lv.kind != "quant" else f"q{lv.bits}g{lv.group_size}"
            c["levels"][key] = c["levels"].get(key, 0) + 1
            c["bytes"] += code_nbytes(lv)
            if err is not None:  # share of the remaining error this level removed
                c["r2"].setdefault(lv.kind, []).append(1.0 - err / prev if prev > 0 else 1.0)
                prev = err
    for c in classes.values():
        c["bits_per_weight"] = 8 * c["bytes"] / c["params"]
        c["r2"] = {k: float(np.mean(v)) for k, v in c["r2"].items()}
    coded = sum(c["bytes"] for c in classes.values())
    raw_bytes = sum(int(a.nbytes) for a in raw.values())
    params = sum(c["params"] for c in classes.values()) + sum(int(a.size) for a in raw.values())
    total = coded + raw_bytes
    return {
        "source": source_name or src.path, "arch": src.arch, "tau": tau, "preset": preset,
        "classes": classes, "coded_bytes": coded, "raw_bytes": raw_bytes, "stored_bytes": total,
        "parameters": params, "bits_per_weight": 8 * total / params,
        "ratio_to_fp16": 2 * params / total, "source_bytes": src.weight_bytes,
        "ratio_to_source": src.weight_bytes / total, "seconds": round(seconds, 1),
        "calibration_seconds": round(calib_seconds, 1),
    }  # fmt: skip


def format_report(r: dict) -> str:
    lines = [f"{'tensor class':<28} {'n':>3} {'levels':<34} {'MB':>8} {'bits/w':>7}  R^2 per level"]
    for name, c in sorted(r["classes"].items()):
        levels = ",".join(f"{k}x{v}" for k, v in sorted(c["levels"].items()))
        r2 = " ".join(f"{k}={v:.3f}" for k, v in c["r2"].items())
        if "predicted_kl" in c:  # rotq: what the class's bytes bought, in the planner's own currency
            r2 += f" output error {c['mean_output_error']:.4f}, predicted KL {c['predicted_kl']:.4f}"
        lines.append(
            f"{name:<28} {c['tensors']:>3} {levels:<34} {c['bytes'] / 1e6:>8.2f} {c['bits_per_weight']:>7.2f}  {r2}"
        )
    target = f"tau {r['tau']:g}" if r.get("tau") is not None else f"target {r.get('bpw_target')} bits/weight"
    size = f"stored {r['stored_bytes'] / 1e6:.2f} MB ({r['bits_per_weight']:.2f} bits/weight), {target}"
    if "heldout_ppl" in r:  # ratios only beside the perplexity measured at them
        size += (
            f" | {r['ratio_to_fp16']:.2f}x smaller than fp16, {r['ratio_to_source']:.2f}x vs the source file's "
            f"weights ({r['source_bytes'] / 1e6:.2f} MB) at held-out ppl {r['heldout_ppl']:.3f} "
            f"(source {r['heldout_ppl_source']:.3f})"
        )
    lines.append(size + f" | {r['seconds']:.0f} s")
    return "\n".join(lines)


def heldout_perplexity(lm, chunks: int = 4, ctx: int = 512) -> float:
    """Perplexity on the shipped held-out text (never used for calibration): the quality beside every ratio."""
    from mmt_mlx.perplexity import perplexity

    text = resources.files("mmt_mlx").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    ids = lm.tokenizer.encode(text, add_bos=False)
    bos = lm.tokenizer.bos_id if lm.tokenizer.bos_id is not None else ids[0]
    return perplexity(lm.model, ids, bos, ctx=min(ctx, lm.context_length), chunks=chunks).ppl
