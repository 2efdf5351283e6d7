"""Plots of evaluation and bench results (PNG files; matplotlib is optional and checked up front)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmt_mlx.bench.stats import APPLE_CHIPS
from mmt_mlx.errors import MmtError


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
    style = {"fgs": ("o-", "FGS presets"), "fgs-dir": ("D", "FGS converted (--bpw)"), "mlx": ("s--", "MLX affine g64"),
             "llama.cpp": ("x:", "llama.cpp requantized")}  # fmt: skip
    for kind, (fmt, label) in style.items():
        pts = sorted((p for p in result["points"] if p["kind"] == kind), key=lambda p: p["stored_bytes"])
        if pts:
            ax.plot([p["stored_bytes"] for p in pts], [p["ppl"] for p in pts], fmt, label=label)
            for p in pts:
                ax.annotate(f"q{p['bits']}" if kind == "mlx" else p["label"].split()[-1],
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


def plot_bench(r: dict, out_png: str) -> None:
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
