"""Chart of bench/server_load.py results: aggregate decode tokens/s and TTFT p50 against concurrent streams.

python bench/plot_server_load.py bench/results/server-load-*.json -o bench/results/server-load.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="JSON files written by bench/server_load.py --json")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for path in args.results:
        with open(path) as f:
            r = json.load(f)
        label = f"{r['model']} ({'dense' if r['dense'] else 'FGS'})"
        n = sorted(int(k) for k in r["streams"])
        ax1.plot(n, [r["streams"][str(k)]["decode_tok_s"] for k in n], marker="o", label=label)
        ax2.plot(n, [r["streams"][str(k)]["ttft_s"]["p50"] for k in n], marker="o", label=label)
    ax1.set(xlabel="concurrent streams", ylabel="aggregate decode tok/s", title="Continuous batching")
    ax2.set(xlabel="concurrent streams", ylabel="time to first token p50 (s)", title="Time to first token")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
