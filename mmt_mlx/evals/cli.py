"""``mmt eval kl`` and ``mmt eval frontier``: argument parsing and printing."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from mmt_mlx.build import load_fgs
from mmt_mlx.convert import PRESETS
from mmt_mlx.errors import MmtError
from mmt_mlx.evals.frontier import DEFAULT_FRONTIER_PRESETS, format_frontier, frontier
from mmt_mlx.evals.kl import kl_eval
from mmt_mlx.evals.text import read_text
from mmt_mlx.fgs_cache import fgs_model_path
from mmt_mlx.loader import load_model
from mmt_mlx.plots import require_matplotlib
from mmt_mlx.registry import BUILTINS, DEFAULT_MODEL


def cmd_eval_kl(a: argparse.Namespace) -> int:
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
