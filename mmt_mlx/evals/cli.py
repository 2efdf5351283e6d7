"""``mmt eval ppl``, ``mmt eval kl`` and ``mmt eval frontier``: argument parsing and printing."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mmt_mlx.build import load_fgs
from mmt_mlx.cli_args import add_model_arg
from mmt_mlx.convert import PRESETS
from mmt_mlx.errors import MmtError
from mmt_mlx.evals.frontier import DEFAULT_FRONTIER_PRESETS, converted_dir, format_frontier, frontier
from mmt_mlx.evals.kl import kl_eval
from mmt_mlx.evals.llamacpp_peers import DEFAULT_LLAMA_TYPES, llamacpp_available, parse_llama_types
from mmt_mlx.evals.text import read_text
from mmt_mlx.fgs.format import is_fgs_dir, read_manifest
from mmt_mlx.fgs_cache import fgs_model_path
from mmt_mlx.loader import load_model
from mmt_mlx.locate import resolve_path
from mmt_mlx.perplexity import perplexity
from mmt_mlx.plots import require_matplotlib


def cmd_eval_kl(a: argparse.Namespace) -> int:
    text = read_text(a.text, a.start)
    if a.ctx < 2 or a.chunks < 0:
        raise MmtError("--ctx must be >= 2 and --chunks >= 0")
    _, model_path = resolve_path(a.model)
    if is_fgs_dir(model_path):  # -m DIR: the directory against the model it was converted from
        if a.candidate or a.preset:
            raise MmtError(
                "-m names an FGS directory: give --preset or --candidate with its source model instead"
            )
        source = read_manifest(model_path).get("report", {}).get("source") or ""
        try:
            if (
                not source
            ):  # an empty argument would resolve to the default model: not this directory's source
                raise MmtError("no source recorded")
            resolve_path(source)
        except MmtError as e:
            raise MmtError(f"{model_path} was converted from {source!r}, which is neither a built-in model nor a "
                           f"file here: use -m SOURCE --candidate {model_path}") from e  # fmt: skip
        a.candidate, a.model = str(model_path), source
    if a.candidate:
        if a.preset:
            raise MmtError("give --preset or --candidate, not both")
        path = converted_dir(a.candidate)
        name, _ = resolve_path(a.model)
    else:
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
    text = read_text(a.text, a.start)
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        raise MmtError(f"unknown preset {bad[0]!r}: choose among {', '.join(PRESETS)}")
    bits = [int(b) for b in a.bits.split(",") if b.strip()]
    if any(b not in (2, 3, 4, 5, 6, 8) for b in bits):
        raise MmtError("--bits takes MLX widths: 2, 3, 4, 5, 6, 8")
    if a.llama_types == "auto":
        llama_types = list(DEFAULT_LLAMA_TYPES) if llamacpp_available() else []
        if not llama_types and not a.json:
            print("llama.cpp points skipped: llama-cpp-python is not installed (pip install 'mmt_mlx[llamacpp]')",
                  file=sys.stderr)  # fmt: skip
    else:
        llama_types = parse_llama_types(a.llama_types)
        if llama_types and not llamacpp_available():
            raise MmtError("--llama-types needs llama-cpp-python: pip install 'mmt_mlx[llamacpp]'")
    dirs = [d.strip() for d in a.fgs_dirs.split(",") if d.strip()]
    if a.out:
        require_matplotlib()  # fail before minutes of work, not after
    r = frontier(a.model, text, presets, bits, a.out, ctx=a.ctx, chunks=a.chunks, progress=not a.json,
                 llama_types=llama_types, fgs_dirs=dirs)  # fmt: skip
    if a.json:
        print(json.dumps(r))
    else:
        print(format_frontier(r))
        if a.out:
            print(f"wrote {a.out}")
    return 0


def cmd_eval_ppl(a: argparse.Namespace) -> int:
    text = read_text(a.text, a.start)
    if a.ctx < 2 or a.chunks < 0:
        raise MmtError("--ctx must be >= 2 and --chunks >= 0")
    lm = load_model(a.model, dense=a.dense)
    if a.ctx > lm.context_length:
        raise MmtError(f"--ctx {a.ctx} exceeds the model's context of {lm.context_length}")
    ids = lm.tokenizer.encode(text, add_bos=False)
    bos = lm.tokenizer.bos_id if lm.tokenizer.bos_id is not None else ids[0]

    def progress(i: int, n: int) -> None:
        if not a.json:
            print(f"\rchunk {i}/{n}", end="", file=sys.stderr, flush=True)

    r = perplexity(lm.model, ids, bos, ctx=a.ctx, chunks=a.chunks, progress=progress, per_token=a.per_token)
    if a.json:
        print(json.dumps({"model": lm.name, "ppl": r.ppl, "tokens": r.tokens, "chunks": r.chunks, "ctx": r.ctx,
                          "per_token": a.per_token,
                          "nll": r.nll, "seconds": round(r.seconds, 3), "tokens_per_second": r.tokens_per_second,
                          "info": lm.info}))  # fmt: skip
    else:
        print(file=sys.stderr)
        how = ", one token per step" if a.per_token else ""
        print(f"{lm.name}: ppl {r.ppl:.4f} over {r.tokens} tokens ({r.chunks} chunks of {r.ctx}{how}), "
              f"{r.tokens_per_second:.1f} tok/s")  # fmt: skip
    return 0


def _text_args(p: argparse.ArgumentParser, chunks: int) -> None:
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--start", default=None, help="score the text from the first occurrence of this string")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=chunks, help="0 = every whole chunk of the text")
    p.add_argument("--json", action="store_true")


def add_eval_parsers(eval_subparsers) -> None:
    """Register ``mmt eval ppl``, ``kl`` and ``frontier`` on the ``eval`` sub-command's subparsers."""
    ppl = eval_subparsers.add_parser("ppl", help="perplexity on a text file (llama.cpp's chunking rule)")
    add_model_arg(ppl, dense=True)
    _text_args(ppl, chunks=8)
    ppl.add_argument("--per-token", action="store_true",
                     help="feed the text one token per step through the cache, as decoding does (slower)")  # fmt: skip
    ppl.set_defaults(func=cmd_eval_ppl)

    kl = eval_subparsers.add_parser(
        "kl", help="KL divergence and top-1 agreement of the FGS model vs the dense one"
    )
    add_model_arg(kl)
    kl.add_argument("--preset", default=None, help="FGS preset of the candidate (default: default)")
    kl.add_argument(
        "--candidate", default=None, help="a converted FGS directory (e.g. mmt convert --bpw) instead"
    )
    _text_args(kl, chunks=4)
    kl.set_defaults(func=cmd_eval_kl)

    fr = eval_subparsers.add_parser(
        "frontier", help="stored bytes vs perplexity: FGS presets, MLX bit widths, llama.cpp types"
    )
    add_model_arg(fr)
    fr.add_argument(
        "--presets", default=",".join(DEFAULT_FRONTIER_PRESETS), help="comma-separated FGS presets"
    )
    fr.add_argument("--bits", default="2,3,4,8", help="comma-separated MLX bit widths (group size 64)")
    fr.add_argument(
        "--llama-types", default="auto",
        help="comma-separated llama.cpp types the GGUF source is requantized to and scored by llama.cpp "
        f"('' for none; auto: {','.join(DEFAULT_LLAMA_TYPES)} when llama-cpp-python is installed)",
    )  # fmt: skip
    fr.add_argument("--fgs-dirs", default="", help="comma-separated converted FGS directories to score too")
    fr.add_argument("--out", default="frontier.png", help="PNG plot ('' for none)")
    _text_args(fr, chunks=8)
    fr.set_defaults(func=cmd_eval_frontier)
