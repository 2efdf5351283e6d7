"""``mmt bench``: llama-bench style speed of the FGS model beside its comparison set, in one run and backend.

Per variant: prompt processing (ppN) and generation (tgN) tokens/s as mean and sample std over repetitions
after a warm-up, peak MLX memory, stored weight bytes, bytes read per generated token, the bandwidth that
implies, and an Apple Silicon estimate from bytes and FLOPs per token. Variants: the FGS model, the dense
model (dequantized source), MLX's 8- and 4-bit quantization of the dense model (group 64), and llama.cpp on the
source GGUF when llama-cpp-python is installed.

Bytes per token counts every weight a decode step reads, at its stored size: FGS codes as stored; dense
arrays as held (f32 on CPU); MLX quantized weights packed with half-precision scales and biases (as MLX saves
them); the embedding lookup reads one row; a tied LM head reads the whole table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mmt_mlx.errors import MmtError

# (memory bandwidth bytes/s, GPU FP32 peak FLOP/s). Bandwidths from Apple's specs (facts.md); the FLOP/s are
# approximate published figures (10-core / 20-core GPU), never the bound for models this size.
APPLE_CHIPS: dict[str, tuple[float, float]] = {"M4": (120e9, 4.3e12), "M4 Pro": (273e9, 8.6e12)}


# ---------------------------------------------------------------------------------------------- arithmetic


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), as llama-bench reports them."""
    if not values:
        return 0.0, 0.0
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def apple_estimates(bytes_per_token: float, flops_per_token: float) -> dict[str, dict]:
    """Predicted decode tok/s per chip: the lower of the bandwidth and compute ceilings (an upper bound:
    real decode adds kernel launches and reaches a fraction of peak bandwidth)."""
    out = {}
    for chip, (bw, peak) in APPLE_CHIPS.items():
        by_bw = bw / bytes_per_token if bytes_per_token > 0 else math.inf
        by_flops = peak / flops_per_token if flops_per_token > 0 else math.inf
        out[chip] = {"tok_s": min(by_bw, by_flops), "bound": "bandwidth" if by_bw <= by_flops else "compute",
                     "bandwidth_tok_s": by_bw, "compute_tok_s": by_flops}  # fmt: skip
    return out


def bench_stats(
    pp_times: list[float],
    tg_times: list[float],
    prompt_tokens: int,
    gen_tokens: int,
    stored_bytes: int,
    bytes_per_token: float,
    flops_per_token: float,
    apple_bytes_per_token: float | None = None,
) -> dict:
    """Everything derived from the timings (seconds per repetition) and the weight accounting."""
    pp_mean, pp_std = mean_std([prompt_tokens / t for t in pp_times if t > 0])
    tg_mean, tg_std = mean_std([gen_tokens / t for t in tg_times if t > 0])
    apple_b = bytes_per_token if apple_bytes_per_token is None else apple_bytes_per_token
    return {
        "pp": {"tokens": prompt_tokens, "tok_s": pp_mean, "std": pp_std, "seconds": list(pp_times)},
        "tg": {"tokens": gen_tokens, "tok_s": tg_mean, "std": tg_std, "seconds": list(tg_times)},
        "stored_bytes": int(stored_bytes),
        "bytes_per_token": float(bytes_per_token),
        "bandwidth_gbs": bytes_per_token * tg_mean / 1e9,  # the weight traffic the measured decode implies
        "flops_per_token": float(flops_per_token),
        "apple_bytes_per_token": float(apple_b),
        "apple": apple_estimates(apple_b, flops_per_token),
    }


def _arrays(m: nn.Module) -> dict[str, mx.array]:
    """The module's own arrays (not its children's)."""
    return {k: v for k, v in m.items() if isinstance(v, mx.array)}


def _half_bytes(a: mx.array) -> int:
    """Bytes of an array held in half precision on a GPU (MLX's compute dtype there is bf16)."""
    return a.size * 2 if mx.issubdtype(a.dtype, mx.floating) else a.nbytes


def weight_bytes(model: nn.Module, codes: dict | None = None, attention_ctx: int = 0) -> dict:
    """Stored bytes, bytes read per decoded token (as run here and as held on Apple GPUs) and FLOPs per
    decoded token of a model. ``codes`` ({weight name: TensorCode}) gives FGS layers their stored code size;
    without it their runtime arrays count. FLOPs: 2 per weight of every matrix product (FGS layers at their
    dense shape: the quant level is dense-shaped, the structured levels add less) plus attention at
    ``attention_ctx`` cached positions."""
    from mmt_mlx.fgs.codec import tensor_nbytes
    from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear

    tied = "lm_head" not in model  # no separate head: the embedding table doubles as the LM head
    stored = per_tok = per_tok_apple = flops = 0.0
    fgs_prefixes: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in fgs_prefixes):
            continue  # levels of an FGS layer, counted with it
        own = _arrays(m)
        if isinstance(m, (FGSLinear, FGSEmbedding)):
            fgs_prefixes.append(name)
            code = (codes or {}).get(f"{name}.weight")
            if code is not None:
                b = tensor_nbytes(code)
            else:
                b = sum(a.nbytes for lv in m.levels for a in _arrays(lv).values())
            b += sum(a.nbytes for a in own.values())  # bias
            bh = b  # codes are read as stored on every backend
            emb = isinstance(m, FGSEmbedding)
            rows, cols = (m.num_embeddings, m.dims) if emb else (m.out_features, m.in_features)
        elif isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            b = sum(a.size * 2 if k in ("scales", "biases") else a.nbytes for k, a in own.items())
            bh = b
            emb = isinstance(m, nn.QuantizedEmbedding)
            rows, cols = m.weight.shape[0], m.weight.shape[1] * 32 // m.bits
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            b = sum(a.nbytes for a in own.values())
            bh = sum(_half_bytes(a) for a in own.values())
            emb = isinstance(m, nn.Embedding)
            rows, cols = m.weight.shape
        else:  # norms and other small tensors: read whole every step
            b = sum(a.nbytes for a in own.values())
            stored += b
            per_tok += b
            per_tok_apple += sum(_half_bytes(a) for a in own.values())
            continue
        stored += b
        if emb:  # the lookup reads one row; a tied head reads the whole table
            per_tok += b / rows + (b if tied else 0)
            per_tok_apple += bh / rows + (bh if tied else 0)
            flops += 2 * rows * cols if tied else 0
        else:
            per_tok += b
            per_tok_apple += bh
            flops += 2 * rows * cols
    args = getattr(model, "args", None)
    if args is not None and attention_ctx > 0:  # q.k and p.v per head per cached position
        flops += 4 * args.num_hidden_layers * args.num_attention_heads * args.head_dim * attention_ctx
    return {"stored_bytes": int(stored), "bytes_per_token": per_tok, "apple_bytes_per_token": per_tok_apple,
            "flops_per_token": flops}  # fmt: skip


def gguf_weight_bytes(path: str | Path) -> dict:
    """The same accounting for llama.cpp on a GGUF file: every tensor as stored, one embedding row per token,
    the whole table again when there is no separate output matrix (tied head)."""
    from mmt_mlx.gguf_file import GGUFFile

    tensors = GGUFFile(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    stored = per_tok = 0.0
    for t in tensors:
        stored += t.n_bytes
        if t.name == "token_embd.weight":
            per_tok += t.n_bytes / t.shape[0] + (t.n_bytes if tied else 0)
        else:
            per_tok += t.n_bytes
    return {"stored_bytes": int(stored), "bytes_per_token": per_tok, "apple_bytes_per_token": per_tok}


# ---------------------------------------------------------------------------------------------- timing


def bench_tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    """Random ids away from the low (special) ids, as llama-bench feeds random tokens."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(1000, vocab // 2), vocab, size=n).tolist()


def time_mlx(model: nn.Module, vocab: int, p: int, g: int, reps: int) -> tuple[list[float], list[float], int]:
    """(pp seconds per rep, tg seconds per rep, peak MLX bytes). pp runs the runtime's prefill (chunked, the
    head only at the last position); tg decodes g tokens greedily one at a time from an empty cache."""
    from mmt_mlx.generate import prefill

    prompt = bench_tokens(vocab, p)

    def pp(tokens: list[int]) -> float:
        cache = model.make_cache()
        t0 = time.perf_counter()
        mx.eval(prefill(model, tokens, cache))
        return time.perf_counter() - t0

    def tg(n: int) -> float:
        cache, tok = model.make_cache(), prompt[0]
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(mx.argmax(model(mx.array([[tok]]), cache)[0, -1]).item())
        return time.perf_counter() - t0

    pp(
        prompt[: min(p, 64)]
    )  # warm-up: allocations and MLX's buffer cache (full length would double slow runs)
    tg(min(g, 8))
    mx.reset_peak_memory()
    pp_t = [pp(prompt) for _ in range(reps)]
    tg_t = [tg(g) for _ in range(reps)]
    return pp_t, tg_t, int(mx.get_peak_memory())


def time_llamacpp(path: str, p: int, g: int, reps: int, threads: int = 2) -> tuple[list[float], list[float]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=p + g + 16, n_batch=max(p, 32), n_threads=threads,
                n_threads_batch=threads, verbose=False)  # fmt: skip
    prompt = bench_tokens(llm.n_vocab(), max(p, g))

    def pp(tokens: list[int]) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - t0

    def tg(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        for tok in prompt[:n]:
            llm.eval([tok])
        return time.perf_counter() - t0

    pp(prompt[: min(p, 64)])
    tg(min(g, 8))
    pp_t = [pp(prompt[:p]) for _ in range(reps)]
    tg_t = [tg(g) for _ in range(reps)]
    if hasattr(llm, "close"):
        llm.close()
    return pp_t, tg_t


# ---------------------------------------------------------------------------------------------- the run


def _source_arg(model_arg: str | None) -> str | None:
    """The model argument whose source the comparison set is built from (None: an FGS directory whose
    source is not a built-in)."""
    from mmt_mlx.fgs.format import is_fgs_dir
    from mmt_mlx.loader import resolve_path
    from mmt_mlx.registry import BUILTINS

    _, path = resolve_path(model_arg)
    if not is_fgs_dir(path):
        return model_arg
    source = json.loads((path / "manifest.json").read_text()).get("report", {}).get("source")
    return source if source in BUILTINS else None


def run_bench(
    model_arg: str | None,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    reps: int = 5,
    compare: bool = True,
    progress: bool = True,
) -> dict:
    """Bench the FGS model of ``model_arg`` and (``compare``) its comparison set; see the module docstring."""
    from mmt_mlx.evals import fgs_model_path, free_memory
    from mmt_mlx.fgs.format import load_fgs_model
    from mmt_mlx.loader import load_fgs, load_source, model_from_source, resolve_path

    if prompt_tokens < 1 or gen_tokens < 1 or reps < 1:
        raise MmtError("-p, -g and -r must be at least 1")
    log: Callable[[str], None] = (
        (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    )
    src_arg = _source_arg(model_arg) if compare else None
    src = load_source(src_arg)[1] if src_arg is not None else None
    name, fgs_path = fgs_model_path(model_arg, src=src, progress=progress)
    variants: list[dict] = []

    def run_mlx(key: str, label: str, loader: Callable[[], tuple[nn.Module, dict | None, int]]) -> None:
        log(f"[bench] {label}: loading")
        model, codes, vocab = loader()
        ctx_len = getattr(getattr(model, "args", None), "max_position_embeddings", 1 << 30)
        if prompt_tokens + gen_tokens > ctx_len:
            raise MmtError(f"-p + -g ({prompt_tokens + gen_tokens}) exceeds the model's context of {ctx_len}")
        log(f"[bench] {label}: pp{prompt_tokens} / tg{gen_tokens} x {reps}")
        pp_t, tg_t, peak = time_mlx(model, vocab, prompt_tokens, gen_tokens, reps)
        w = weight_bytes(model, codes, attention_ctx=gen_tokens // 2)
        v = {"key": key, "label": label, "peak_memory": peak,
             **bench_stats(pp_t, tg_t, prompt_tokens, gen_tokens, **w)}  # fmt: skip
        variants.append(v)
        log(f"[bench] {label}: pp {v['pp']['tok_s']:.1f} tok/s, tg {v['tg']['tok_s']:.2f} tok/s")
        del model, codes
        free_memory()

    def fgs_loader():
        lm = load_fgs(fgs_path, name)
        return lm.model, load_fgs_model(fgs_path)[1], lm.model.args.vocab_size

    preset = json.loads((fgs_path / "manifest.json").read_text()).get("report", {}).get("preset") or "?"
    run_mlx("fgs", f"FGS {preset}", fgs_loader)
    if src is not None:
        run_mlx(
            "dense", "dense f32", lambda: (model_from_source(src, name).model, None, src.config["vocab_size"])
        )
        for bits in (8, 4):

            def quant_loader(bits: int = bits):
                model = model_from_source(src, name).model
                nn.quantize(model, group_size=64, bits=bits)
                mx.eval(model.parameters())
                return model, None, src.config["vocab_size"]

            run_mlx(f"mlx-q{bits}", f"MLX q{bits} g64", quant_loader)
        gguf_path = resolve_path(src_arg)[1]
        if str(gguf_path).endswith(".gguf"):
            try:
                import llama_cpp  # noqa: F401  (optional comparison, never required)
            except ImportError:
                log("[bench] llama.cpp: llama-cpp-python not installed, skipped")
            else:
                log(f"[bench] llama.cpp: pp{prompt_tokens} / tg{gen_tokens} x {reps}")
                pp_t, tg_t = time_llamacpp(str(gguf_path), prompt_tokens, gen_tokens, reps)
                w = gguf_weight_bytes(gguf_path)
                flops = next(v["flops_per_token"] for v in variants if v["key"] == "dense")  # same shapes
                variants.append({"key": "llama.cpp", "label": "llama.cpp (GGUF)", "peak_memory": None,
                                 **bench_stats(pp_t, tg_t, prompt_tokens, gen_tokens, flops_per_token=flops, **w)})  # fmt: skip
    return {
        "model": name, "fgs_path": str(fgs_path), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "reps": reps, "backend": f"mlx {mx.__version__} {mx.default_device()}", "variants": variants,
        "apple_chips": {k: {"bandwidth_gbs": bw / 1e9, "fp32_tflops": f / 1e12} for k, (bw, f) in APPLE_CHIPS.items()},
        "load_average": _loadavg(),
    }  # fmt: skip


def _loadavg() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- output


def format_table(r: dict) -> str:
    p, g = r["prompt_tokens"], r["gen_tokens"]
    chips = list(APPLE_CHIPS)
    head = (f"| variant | stored MB | MB/token | pp{p} tok/s | tg{g} tok/s | peak MB | GB/s | "
            + " | ".join(f"{c} est tok/s" for c in chips) + " |")  # fmt: skip
    lines = [f"{r['model']} on {r['backend']}, {r['reps']} reps, load avg {r.get('load_average')}", head,
             "|" + "---|" * (7 + len(chips))]  # fmt: skip
    for v in r["variants"]:
        peak = f"{v['peak_memory'] / 1e6:.0f}" if v.get("peak_memory") else "-"
        est = " | ".join(f"{v['apple'][c]['tok_s']:.0f}" for c in chips)
        lines.append(
            f"| {v['label']} | {v['stored_bytes'] / 1e6:.1f} | {v['bytes_per_token'] / 1e6:.1f} | "
            f"{v['pp']['tok_s']:.1f} ± {v['pp']['std']:.1f} | {v['tg']['tok_s']:.2f} ± {v['tg']['std']:.2f} | "
            f"{peak} | {v['bandwidth_gbs']:.2f} | {est} |"
        )
    lines.append(
        "Apple estimates: bandwidth / bytes per token at the GPU's layout (dense in bf16), compute ceiling "
        "from FLOPs per token; upper bounds, every one bandwidth-bound here"
        if all(v["apple"][c]["bound"] == "bandwidth" for v in r["variants"] for c in chips)
        else "Apple estimates: min(bandwidth / bytes, peak FLOP/s / FLOPs) per token; upper bounds"
    )
    return "\n".join(lines)


def plot_bench(r: dict, out_png: str) -> None:
    from mmt_mlx.evals import require_matplotlib

    plt = require_matplotlib()
    vs = r["variants"]
    labels = [v["label"] for v in vs]
    x = np.arange(len(vs))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key, title in (
        (axes[0], "pp", f"prompt pp{r['prompt_tokens']}"),
        (axes[1], "tg", f"decode tg{r['gen_tokens']}"),
    ):
        ax.bar(x, [v[key]["tok_s"] for v in vs], yerr=[v[key]["std"] for v in vs], capsize=3)
        ax.set_title(f"{title} (this machine)")
        ax.set_ylabel("tokens/s")
    width = 0.8 / len(APPLE_CHIPS)
    for i, chip in enumerate(APPLE_CHIPS):
        axes[2].bar(x + (i - (len(APPLE_CHIPS) - 1) / 2) * width, [v["apple"][chip]["tok_s"] for v in vs], width,
                    label=chip)  # fmt: skip
    axes[2].set_title("decode estimate, Apple Silicon (bandwidth bound)")
    axes[2].set_ylabel("tokens/s (upper bound)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{r['model']}: {r['backend']}, {r['reps']} reps")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def cmd_bench(a: argparse.Namespace) -> int:
    if a.plot:
        from mmt_mlx.evals import require_matplotlib

        require_matplotlib()  # fail before minutes of benchmarking, not after
    r = run_bench(a.model, a.prompt_tokens, a.gen_tokens, a.reps, compare=not a.no_compare, progress=True)
    if a.plot:
        plot_bench(r, a.plot)
        r["plot"] = a.plot
    if a.json == "-":
        print(json.dumps(r))
        return 0
    print(format_table(r))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=1))
        print(f"wrote {a.json}")
    if a.plot:
        print(f"wrote {a.plot}")
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mmt bench`` on the top-level subparsers."""
    from mmt_mlx.registry import BUILTINS, DEFAULT_MODEL

    b = subparsers.add_parser("bench", help="llama-bench style speed: FGS vs dense, MLX q4/q8, llama.cpp")
    b.add_argument("--model", "-m", default=None,
                   help=f"built-in name ({', '.join(BUILTINS)}; default {DEFAULT_MODEL}), a .gguf file or a model directory")  # fmt: skip
    b.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prompt tokens (default 512)")
    b.add_argument("-g", "--gen-tokens", type=int, default=128, help="generated tokens (default 128)")
    b.add_argument("-r", "--reps", type=int, default=5, help="repetitions (default 5)")
    b.add_argument("--json", nargs="?", const="-", default=None,
                   help="print JSON instead of the table, or write it to FILE beside the table")  # fmt: skip
    b.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart (needs matplotlib)")
    b.add_argument("--no-compare", action="store_true", help="bench the FGS model only")
    b.set_defaults(func=cmd_bench)
    return b
