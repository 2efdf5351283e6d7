"""``mmt bench``: argument parsing, the markdown table, JSON and plot output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmt_mlx.bench.run import run_bench
from mmt_mlx.bench.stats import APPLE_CHIPS
from mmt_mlx.cli_args import add_model_arg
from mmt_mlx.plots import plot_bench, require_matplotlib


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


def cmd_bench(a: argparse.Namespace) -> int:
    if a.plot:
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
    b = subparsers.add_parser("bench", help="llama-bench style speed: FGS vs dense, MLX q4/q8, llama.cpp")
    add_model_arg(b)
    b.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prompt tokens (default 512)")
    b.add_argument("-g", "--gen-tokens", type=int, default=128, help="generated tokens (default 128)")
    b.add_argument("-r", "--reps", type=int, default=5, help="repetitions (default 5)")
    b.add_argument("--json", nargs="?", const="-", default=None,
                   help="print JSON instead of the table, or write it to FILE beside the table")  # fmt: skip
    b.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart (needs matplotlib)")
    b.add_argument("--no-compare", action="store_true", help="bench the FGS model only")
    b.set_defaults(func=cmd_bench)
    return b
