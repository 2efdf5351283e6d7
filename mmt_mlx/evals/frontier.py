"""The bytes-vs-perplexity frontier: the source, the dense model, FGS at several presets (and any converted FGS
directories), MLX at several bit widths and llama.cpp's own quantization types, all scored with the chunking of
``mmt eval ppl``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mmt_mlx.build import load_fgs, model_from_source
from mmt_mlx.errors import MmtError
from mmt_mlx.evals.kl import model_module
from mmt_mlx.evals.llamacpp_peers import llamacpp_points
from mmt_mlx.evals.text import free_memory
from mmt_mlx.fgs.format import is_fgs_dir
from mmt_mlx.fgs_cache import fgs_model_path
from mmt_mlx.locate import load_source
from mmt_mlx.perplexity import perplexity
from mmt_mlx.plots import plot_frontier
from mmt_mlx.sources import SourceModel

DEFAULT_FRONTIER_PRESETS = ("high", "default", "small", "smallest", "tiny")


def mlx_fake_quantized(src: SourceModel, name: str, bits: int, group_size: int = 64):
    """Dense model whose 2-D weights went through mx.quantize/mx.dequantize (f32 compute: quantized_matmul
    runs ~2 GFLOP/s on Linux CPU; the perplexity is the same), and the stored bytes of the quantized model:
    packed weights, scales and biases in half precision (what MLX saves for a half-precision model, and how
    the FGS quant level stores them), other tensors as held. Same predicate as ``nn.quantize``."""
    fake, stored = {}, 0
    for k, v in src.weights.items():
        if v.ndim == 2 and v.shape[-1] % group_size == 0:
            wq, scales, biases = mx.quantize(mx.array(v), group_size=group_size, bits=bits)
            fake[k] = np.asarray(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits))
            stored += wq.nbytes + 2 * (scales.size + biases.size)
        else:
            fake[k] = v
            stored += v.nbytes
    fq = SourceModel(src.arch, src.config, fake, src.tokenizer, src.path, src.weight_bytes, src.meta)
    return model_from_source(fq, f"{name}-mlx-q{bits}"), int(stored)


def shown(p: dict) -> None:
    """One frontier point as a progress line on stderr."""
    print(
        f"  {p['label']:<22} {p['stored_bytes'] / 1e6:9.2f} MB  ppl {p['ppl']:.4f}",
        file=sys.stderr,
        flush=True,
    )


def converted_dir(d: str) -> Path:
    """``d`` as a Path if it is an FGS model directory, else a clear error."""
    if not is_fgs_dir(Path(d)):
        raise MmtError(f"{d}: not an FGS model directory (mmt convert -o DIR writes one)")
    return Path(d)


def frontier(
    model_arg: str | None,
    text: str,
    presets: tuple[str, ...] | list[str] = DEFAULT_FRONTIER_PRESETS,
    mlx_bits: tuple[int, ...] | list[int] = (2, 3, 4, 8),
    out_png: str | None = None,
    ctx: int = 512,
    chunks: int = 8,
    progress: bool = True,
    llama_types: tuple[str, ...] | list[str] = (),
    fgs_dirs: tuple[str, ...] | list[str] = (),
) -> dict:
    """Stored bytes and perplexity of: the source file, the dense model, FGS at each preset and each converted
    FGS directory in ``fgs_dirs`` (``mmt convert --bpw`` output), MLX at each bit width (group 64), llama.cpp's
    requantization of a GGUF source at each of ``llama_types``. Writes a log-log plot to ``out_png`` when given.
    Returns {"model", "points", ...}."""
    name, src = load_source(model_arg)
    if llama_types and Path(str(src.path)).suffix.lower() != ".gguf":
        raise MmtError(f"llama.cpp peers need a GGUF source; {name} reads {src.path}")
    dirs = [converted_dir(d) for d in fgs_dirs]  # fail before minutes of work, not after
    tok = src.tokenizer
    ids = tok.encode(text, add_bos=False)
    bos = tok.bos_id if tok.bos_id is not None else ids[0]
    params = int(sum(v.size for v in src.weights.values()))
    points: list[dict] = []

    def score(label: str, kind: str, model, stored: int, **extra) -> None:
        t0 = time.perf_counter()
        r = perplexity(model_module(model), ids, bos, ctx=ctx, chunks=chunks)
        p = {"label": label, "kind": kind, "stored_bytes": int(stored), "bits_per_weight": 8 * stored / params,
             "ppl": r.ppl, "tokens": r.tokens, "seconds": round(time.perf_counter() - t0, 1), **extra}  # fmt: skip
        points.append(p)
        if progress:
            shown(p)

    dense = model_from_source(src, name)
    dense_bytes = int(sum(v.size * 4 for v in src.weights.values()))
    score("dense f32", "dense", dense, dense_bytes)
    # the source file's weights dequantize to exactly the dense model: same perplexity, the file's bytes
    points.append(dict(points[-1], label="source file", kind="source", stored_bytes=int(src.weight_bytes),
                       bits_per_weight=8 * src.weight_bytes / params, seconds=0.0))  # fmt: skip
    del dense
    free_memory()
    for bits in mlx_bits:
        lm, stored = mlx_fake_quantized(src, name, bits)
        score(f"MLX q{bits} g64", "mlx", lm, stored, bits=bits)
        del lm
        free_memory()
    for preset in presets:
        _, path = fgs_model_path(model_arg, preset, src=src, progress=progress)
        lm = load_fgs(path, name)
        score(f"FGS {preset}", "fgs", lm, int(lm.info["stored_bytes"]), preset=preset, tau=lm.info.get("tau"))
        del lm
        free_memory()
    for path in dirs:
        lm = load_fgs(path, name)
        score(f"FGS {path.name}", "fgs-dir", lm, int(lm.info["stored_bytes"]), path=str(path))
        del lm
        free_memory()
    if llama_types:
        points += llamacpp_points(src.path, list(llama_types), ids, bos, params, ctx, chunks,
                                  progress=shown if progress else None)  # fmt: skip
    result = {"model": name, "ctx": ctx, "chunks": chunks, "parameters": params, "points": points}
    if out_png:
        plot_frontier(result, out_png)
        result["plot"] = str(out_png)
    return result


def format_frontier(result: dict) -> str:
    lines = [f"{result['model']}: {result['points'][0]['tokens']} tokens scored ({result['chunks']} x {result['ctx']})",
             f"{'variant':<22} {'stored MB':>10} {'bits/w':>7} {'ppl':>12}"]  # fmt: skip
    for p in sorted(result["points"], key=lambda p: p["stored_bytes"]):
        lines.append(
            f"{p['label']:<22} {p['stored_bytes'] / 1e6:>10.2f} {p['bits_per_weight']:>7.2f} {p['ppl']:>12.4g}"
        )
    return "\n".join(lines)
