"""Quality beside size: KL divergence against the dense model, and the bytes-vs-perplexity frontier.

``mmt eval kl`` compares the next-token distributions of a candidate (the FGS model by default) with the dense
(dequantized source) model on a text. ``mmt eval frontier`` converts the model at several presets, quantizes it
with MLX at several bit widths, and plots stored bytes against perplexity (the same chunking rule as
``mmt eval ppl``: BOS + ctx-1 tokens per chunk, every token after BOS scored).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.errors import MmtError
from mmt_mlx.perplexity import chunk_tokens, perplexity
from mmt_mlx.sources import SourceModel

DEFAULT_FRONTIER_PRESETS = ("high", "default", "small", "smallest", "tiny")


def _module(m) -> nn.Module:
    """Accept a LoadedModel or a bare model module."""
    return getattr(m, "model", m)


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


# ---------------------------------------------------------------------------------------------- KL divergence


@dataclass
class KLResult:
    kl: float  # mean KL(reference || candidate) per scored position, nats
    kl_max: float  # the worst position
    top1_agreement: float  # fraction of positions where both argmaxes agree
    ppl_candidate: float
    ppl_reference: float
    tokens: int
    chunks: int
    ctx: int
    seconds: float


def kl_eval(
    model_a, model_b_reference, ids: list[int], ctx: int = 512, chunks: int = 4, bos: int | None = None
) -> KLResult:
    """KL(reference || candidate) of next-token distributions, averaged over every scored position.

    Chunks follow ``mmt eval ppl`` when ``bos`` is given (BOS + ctx-1 tokens); otherwise ids are cut in
    chunks of ctx. Perplexities of both models on the same positions come for free.
    """
    cand, ref = _module(model_a), _module(model_b_reference)
    if ctx < 2:
        raise MmtError("ctx must be at least 2")
    if bos is not None:
        parts = chunk_tokens(ids, bos, ctx, chunks)
    else:
        n = len(ids) // ctx
        if n == 0:
            raise MmtError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}")
        parts = [ids[i * ctx : (i + 1) * ctx] for i in range(n if chunks <= 0 else min(chunks, n))]
    kl_sum = agree = nll_c = nll_r = 0.0
    kl_max, count = 0.0, 0
    t0 = time.perf_counter()
    for part in parts:
        x = mx.array(part)[None]
        target = x[0, 1:]
        # one model at a time, evaluated, so only one (ctx, vocab) logit block per model is alive
        lr = ref(x[:, :-1], ref.make_cache())[0].astype(mx.float32)
        lr = lr - mx.logsumexp(lr, axis=-1, keepdims=True)
        mx.eval(lr)
        lc = cand(x[:, :-1], cand.make_cache())[0].astype(mx.float32)
        lc = lc - mx.logsumexp(lc, axis=-1, keepdims=True)
        kl = mx.sum(mx.exp(lr) * (lr - lc), axis=-1)  # (positions,)
        same = mx.argmax(lr, axis=-1) == mx.argmax(lc, axis=-1)
        tr = -mx.take_along_axis(lr, target[:, None], axis=-1)
        tc = -mx.take_along_axis(lc, target[:, None], axis=-1)
        mx.eval(kl, same, tr, tc)
        kl_np = np.maximum(np.asarray(kl, dtype=np.float64), 0.0)  # rounding can dip a hair below 0
        kl_sum += float(kl_np.sum())
        kl_max = max(kl_max, float(kl_np.max()))
        agree += float(np.asarray(same).sum())
        nll_r += float(np.asarray(tr, dtype=np.float64).sum())
        nll_c += float(np.asarray(tc, dtype=np.float64).sum())
        count += len(part) - 1
        del lr, lc, kl
    dt = time.perf_counter() - t0
    return KLResult(
        kl_sum / count, kl_max, agree / count, math.exp(nll_c / count), math.exp(nll_r / count),
        count, len(parts), ctx, dt,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- FGS conversions


def fgs_model_path(
    model_arg: str | None, preset: str | None = None, src: SourceModel | None = None, progress: bool = True
) -> tuple[str, Path]:
    """(name, FGS directory) of a model argument at a preset, converting once into the cache.

    FGS directories are returned as they are; built-ins at the default preset share the loader's cache entry.
    """
    from mmt_mlx.convert import DEFAULT_PRESET, PRESETS, convert
    from mmt_mlx.fgs.format import FORMAT_VERSION, is_fgs_dir
    from mmt_mlx.loader import _read_source, builtin_fgs_path, resolve_path
    from mmt_mlx.registry import BUILTINS, cache_dir

    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise MmtError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    name, path = resolve_path(model_arg)
    if is_fgs_dir(path):
        return name, path
    if name in BUILTINS:
        if preset == DEFAULT_PRESET:
            return name, builtin_fgs_path(name, progress)
        key = name
    else:  # a file or directory: key the cache by its absolute path, size and mtime
        st = path.stat()
        h = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
        key = f"{path.stem}-{h}"
    out = (
        cache_dir() / "fgs" / f"{key}-{preset}-tau{PRESETS[preset]:g}-v{FORMAT_VERSION}"
    )  # retuned presets miss
    if not is_fgs_dir(out):
        print(f"converting {name} to FGS codes (preset {preset}); cached in {out}", file=sys.stderr)
        convert(src if src is not None else _read_source(path), out, preset=preset, progress=progress,
                source_name=name, overwrite=True)  # fmt: skip
    return name, out


# ---------------------------------------------------------------------------------------------- frontier


def mlx_fake_quantized(src: SourceModel, name: str, bits: int, group_size: int = 64):
    """Dense model whose 2-D weights went through mx.quantize/mx.dequantize (f32 compute: quantized_matmul
    runs ~2 GFLOP/s on Linux CPU; the perplexity is the same), and the stored bytes of the quantized model:
    packed weights, scales and biases in half precision (what MLX saves for a half-precision model, and how
    the FGS quant level stores them), other tensors as held. Same predicate as ``nn.quantize``."""
    from mmt_mlx.loader import model_from_source

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


def frontier(
    model_arg: str | None,
    text: str,
    presets: tuple[str, ...] | list[str] = DEFAULT_FRONTIER_PRESETS,
    mlx_bits: tuple[int, ...] | list[int] = (2, 3, 4, 8),
    out_png: str | None = None,
    ctx: int = 512,
    chunks: int = 8,
    progress: bool = True,
) -> dict:
    """Stored bytes and perplexity of: the source file, the dense model, FGS at each preset, MLX at each bit
    width (group 64). Writes a log-log plot to ``out_png`` when given. Returns {"model", "points", ...}."""
    from mmt_mlx.loader import load_fgs, load_source, model_from_source

    name, src = load_source(model_arg)
    tok = src.tokenizer
    ids = tok.encode(text, add_bos=False)
    bos = tok.bos_id if tok.bos_id is not None else ids[0]
    params = int(sum(v.size for v in src.weights.values()))
    points: list[dict] = []

    def score(label: str, kind: str, model, stored: int, **extra) -> None:
        t0 = time.perf_counter()
        r = perplexity(_module(model), ids, bos, ctx=ctx, chunks=chunks)
        p = {"label": label, "kind": kind, "stored_bytes": int(stored), "bits_per_weight": 8 * stored / params,
             "ppl": r.ppl, "tokens": r.tokens, "seconds": round(time.perf_counter() - t0, 1), **extra}  # fmt: skip
        points.append(p)
        if progress:
            print(f"  {label:<22} {stored / 1e6:9.2f} MB  ppl {r.ppl:.4f}", file=sys.stderr, flush=True)

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


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise MmtError(
            "plotting needs matplotlib: pip install 'mmt-mlx[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def plot_frontier(result: dict, out_png: str) -> None:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"fgs": ("o-", "FGS presets"), "mlx": ("s--", "MLX affine g64")}
    for kind, (fmt, label) in style.items():
        pts = sorted((p for p in result["points"] if p["kind"] == kind), key=lambda p: p["stored_bytes"])
        if pts:
            ax.plot([p["stored_bytes"] for p in pts], [p["ppl"] for p in pts], fmt, label=label)
            for p in pts:
                ax.annotate(p["label"].split()[-1] if kind == "fgs" else f"q{p['bits']}",
                            (p["stored_bytes"], p["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
    for p in result["points"]:
        if p["kind"] in ("source", "dense"):
            ax.plot(
                [p["stored_bytes"]], [p["ppl"]], "k^" if p["kind"] == "source" else "kv", label=p["label"]
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stored weight bytes")
    ax.set_ylabel(f"perplexity ({result['chunks']} x {result['ctx']} tokens)")
    ax.set_title(f"{result['model']}: size vs perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI


def cmd_eval_kl(a: argparse.Namespace) -> int:
    from mmt_mlx.loader import load_fgs, load_model

    text = read_text(a.text, a.start)
    if a.ctx < 2 or a.chunks < 0:
        raise MmtError("--ctx must be >= 2 and --chunks >= 0")
    name, path = fgs_model_path(a.model, a.preset, progress=not a.json)
    cand = load_fgs(path, name)
    ref = load_model(a.model, dense=True)
    if a.ctx > ref.context_length:
        raise MmtError(f"--ctx {a.ctx} exceeds the model's context of {ref.context_length}")
    ids = ref.tokenizer.encode(text, add_bos=False)
    bos = ref.tokenizer.bos_id if ref.tokenizer.bos_id is not None else ids[0]
    r = kl_eval(cand, ref, ids, ctx=a.ctx, chunks=a.chunks, bos=bos)
    if a.json:
        print(json.dumps({"model": name, "candidate": str(path), **asdict(r)}))
    else:
        print(f"{name} (FGS {path.name}) vs dense: KL {r.kl:.5f} nats/token (max {r.kl_max:.3f}), top-1 agreement "
              f"{100 * r.top1_agreement:.2f}%, ppl {r.ppl_candidate:.4f} vs {r.ppl_reference:.4f} "
              f"over {r.tokens} tokens")  # fmt: skip
    return 0


def cmd_eval_frontier(a: argparse.Namespace) -> int:
    from mmt_mlx.convert import PRESETS

    text = read_text(a.text, a.start)
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        raise MmtError(f"unknown preset {bad[0]!r}: choose among {', '.join(PRESETS)}")
    bits = [int(b) for b in a.bits.split(",") if b.strip()]
    if any(b not in (2, 3, 4, 5, 6, 8) for b in bits):
        raise MmtError("--bits takes MLX widths: 2, 3, 4, 5, 6, 8")
    if a.out:
        require_matplotlib()  # fail before minutes of work, not after
    r = frontier(a.model, text, presets, bits, a.out, ctx=a.ctx, chunks=a.chunks, progress=not a.json)
    if a.json:
        print(json.dumps(r))
    else:
        print(format_frontier(r))
        if a.out:
            print(f"wrote {a.out}")
    return 0


def add_eval_parsers(eval_subparsers) -> None:
    """Register ``mmt eval kl`` and ``mmt eval frontier`` on the ``eval`` sub-command's subparsers."""
    from mmt_mlx.registry import BUILTINS, DEFAULT_MODEL

    model_help = (
        f"built-in name ({', '.join(BUILTINS)}; default {DEFAULT_MODEL}), a .gguf file or a model directory"
    )
    kl = eval_subparsers.add_parser(
        "kl", help="KL divergence and top-1 agreement of the FGS model vs the dense one"
    )
    kl.add_argument("--model", "-m", default=None, help=model_help)
    kl.add_argument("--preset", default=None, help="FGS preset of the candidate (default: default)")
    kl.add_argument("--text", required=True, help="UTF-8 text file")
    kl.add_argument("--start", default=None, help="score the text from the first occurrence of this string")
    kl.add_argument("--ctx", type=int, default=512)
    kl.add_argument("--chunks", type=int, default=4, help="0 = every whole chunk of the text")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=cmd_eval_kl)

    fr = eval_subparsers.add_parser(
        "frontier", help="stored bytes vs perplexity: FGS presets and MLX bit widths"
    )
    fr.add_argument("--model", "-m", default=None, help=model_help)
    fr.add_argument("--text", required=True, help="UTF-8 text file")
    fr.add_argument("--start", default=None, help="score the text from the first occurrence of this string")
    fr.add_argument(
        "--presets", default=",".join(DEFAULT_FRONTIER_PRESETS), help="comma-separated FGS presets"
    )
    fr.add_argument("--bits", default="2,3,4,8", help="comma-separated MLX bit widths (group size 64)")
    fr.add_argument("--ctx", type=int, default=512)
    fr.add_argument("--chunks", type=int, default=8)
    fr.add_argument("--out", default="frontier.png", help="PNG plot ('' for none)")
    fr.add_argument("--json", action="store_true")
    fr.set_defaults(func=cmd_eval_frontier)
