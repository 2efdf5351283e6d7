"""One ``mmt bench`` run: the FGS model and its comparison set, timed in one process and backend."""

from __future__ import annotations

import sys
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mmt_mlx.apple_estimate import count_kernels
from mmt_mlx.bench.accounting import gguf_weight_bytes, weight_bytes
from mmt_mlx.bench.llamacpp import LlamaCppTimer
from mmt_mlx.bench.stats import APPLE_CHIPS, bench_stats
from mmt_mlx.bench.timing import MlxTimer, time_alternating, time_mlx
from mmt_mlx.build import LoadedModel, load_fgs, model_from_source
from mmt_mlx.errors import MmtError
from mmt_mlx.evals.text import free_memory
from mmt_mlx.fgs.format import is_fgs_dir, load_fgs_model, read_manifest
from mmt_mlx.fgs_cache import fgs_model_path
from mmt_mlx.locate import load_source, resolve_path
from mmt_mlx.registry import BUILTINS, DEFAULT_MODEL


def comparison_source(model_arg: str | None) -> str | None:
    """The model argument whose source the comparison set is built from (None: an FGS directory whose
    source is not a built-in)."""
    _, path = resolve_path(model_arg)
    if not is_fgs_dir(path):
        return model_arg or DEFAULT_MODEL
    source = read_manifest(path).get("report", {}).get("source")
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
    if prompt_tokens < 1 or gen_tokens < 1 or reps < 1:
        raise MmtError("-p, -g and -r must be at least 1")
    log: Callable[[str], None] = (
        (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    )
    src_arg = comparison_source(model_arg) if compare else None
    src = load_source(src_arg)[1] if src_arg is not None else None
    name, fgs_path = fgs_model_path(model_arg, src=src, progress=progress)
    variants: list[dict] = []

    def check_context(model) -> None:
        ctx_len = getattr(getattr(model, "args", None), "max_position_embeddings", 1 << 30)
        if prompt_tokens + gen_tokens > ctx_len:
            raise MmtError(f"-p + -g ({prompt_tokens + gen_tokens}) exceeds the model's context of {ctx_len}")

    def add_mlx(
        key: str, label: str, model, codes: dict | None, times: tuple[list[float], list[float]], peak: int
    ):
        w = weight_bytes(model, codes, attention_ctx=gen_tokens // 2)
        v = {"key": key, "label": label, "peak_memory": peak,
             **bench_stats(*times, prompt_tokens, gen_tokens, kernels_per_token=count_kernels(model), **w)}  # fmt: skip
        variants.append(v)
        log(f"[bench] {label}: pp {v['pp']['tok_s']:.1f} tok/s, tg {v['tg']['tok_s']:.2f} tok/s")

    def run_mlx(key: str, label: str, loader: Callable[[], tuple[LoadedModel, dict | None, int]]) -> None:
        log(f"[bench] {label}: loading")
        lm, codes, vocab = loader()
        check_context(lm.model)
        log(f"[bench] {label}: pp{prompt_tokens} / tg{gen_tokens} x {reps}")
        pp_t, tg_t, peak = time_mlx(lm, vocab, prompt_tokens, gen_tokens, reps)
        add_mlx(key, label, lm.model, codes, (pp_t, tg_t), peak)
        del lm, codes
        free_memory()

    # The FGS model first. When llama.cpp runs too, the two take their reps in turn (time_alternating), so
    # that the headline ratio does not depend on this host's drift between them; the other rows follow alone.
    preset = read_manifest(fgs_path).get("report", {}).get("preset") or "?"
    label = f"FGS {preset}"
    log(f"[bench] {label}: loading")
    lm = load_fgs(fgs_path, name)
    codes = load_fgs_model(fgs_path)[1]
    check_context(lm.model)
    gguf_path = resolve_path(src_arg)[1] if src is not None else None
    llama = _llama_timer(gguf_path, prompt_tokens, gen_tokens, log)
    if llama is None:
        log(f"[bench] {label}: pp{prompt_tokens} / tg{gen_tokens} x {reps}")
        pp_t, tg_t, peak = time_mlx(lm, lm.model.args.vocab_size, prompt_tokens, gen_tokens, reps)
        llama_times = None
    else:
        log(f"[bench] {label} and llama.cpp, rep by rep: pp{prompt_tokens} / tg{gen_tokens} x {reps}")
        mx.reset_peak_memory()
        timers = [MlxTimer(lm, lm.model.args.vocab_size, prompt_tokens, gen_tokens), llama]
        (pp_t, tg_t), llama_times = time_alternating(timers, reps)
        peak = int(mx.get_peak_memory())
        llama.close()
        del timers, llama  # the timer holds the model: the rows after this one must not count its memory
    add_mlx("fgs", label, lm.model, codes, (pp_t, tg_t), peak)
    del lm, codes
    free_memory()
    if src is not None:
        run_mlx("dense", "dense f32", lambda: (model_from_source(src, name), None, src.config["vocab_size"]))
        for bits in (8, 4):

            def quant_loader(bits: int = bits):
                lm = model_from_source(src, name)
                nn.quantize(lm.model, group_size=64, bits=bits)
                mx.eval(lm.model.parameters())
                return lm, None, src.config["vocab_size"]

            run_mlx(f"mlx-q{bits}", f"MLX q{bits} g64", quant_loader)
    if llama_times is not None and gguf_path is not None:
        w = gguf_weight_bytes(gguf_path)
        flops = next(v["flops_per_token"] for v in variants if v["key"] == "dense")  # same shapes
        variants.append({"key": "llama.cpp", "label": "llama.cpp (GGUF)", "peak_memory": None,
                         **bench_stats(*llama_times, prompt_tokens, gen_tokens, flops_per_token=flops, **w)})  # fmt: skip
        log(
            f"[bench] llama.cpp: pp {variants[-1]['pp']['tok_s']:.1f} tok/s, tg {variants[-1]['tg']['tok_s']:.2f} tok/s"
        )
    return {
        "model": name, "fgs_path": str(fgs_path), "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "reps": reps, "backend": f"mlx {mx.__version__} {mx.default_device()}", "variants": variants,
        "apple_chips": {k: {"bandwidth_gbs": bw / 1e9, "fp32_tflops": f / 1e12} for k, (bw, f) in APPLE_CHIPS.items()},
        "load_average": _loadavg(),
        "timing": "FGS and llama.cpp reps alternating" if llama_times is not None else "each variant alone",
    }  # fmt: skip


def _llama_timer(gguf_path, p: int, g: int, log: Callable[[str], None]) -> LlamaCppTimer | None:
    """llama.cpp on the source GGUF, when there is one and llama-cpp-python is installed (never required)."""
    if gguf_path is None or not str(gguf_path).endswith(".gguf"):
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        log("[bench] llama.cpp: llama-cpp-python not installed, skipped")
        return None
    return LlamaCppTimer(str(gguf_path), p, g)


def _loadavg() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
