"""Where one decode step's time goes on the CPU: graph nodes per token by kind, and the step split into graph
building (Python), the weight products, and everything else.

    python bench/decode_profile.py [-m MODEL] [--steps 32] [--context 64] [--json FILE]

A step is one token through the model with a cache of ``--context`` tokens (``mmt bench -p 256`` decodes
after 256), timed synchronously (build, then eval). The
products are then timed alone: the same levels on inputs of the same shapes, evaluated together. "Other" is
the step's evaluation minus the products (norms, RoPE, attention, cache writes, residual adds, views, and
MLX's per-node scheduling). In the generator, building overlaps evaluation (``mx.async_eval``), so decode
tokens/s is about 1 / max(build, eval). The products timed alone run one node each (on one thread, as outside
a fused layer); the fused decode layers (``mmt_mlx/models/fused_layer.py``) share theirs over the pool, and
their own profile (products, attention, the rest, inside the layer nodes) is reported beside.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import time

# isort: off
import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

from mmt_mlx import native
from mmt_mlx.fgs.runtime.layers import QuantLevel
from mmt_mlx.fgs.runtime.rotq_layer import RotQLevel
from mmt_mlx.loader import load_model
from mmt_mlx.native import describe
# isort: on


def node_kinds(out: mx.array) -> collections.Counter:
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, out)
        labels = re.findall(r'label ="([^"]+)", shape=rectangle', open(path).read())
    finally:
        os.unlink(path)
    return collections.Counter(label.split()[0] for label in labels)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--context", type=int, default=64, help="tokens in the cache before the timed steps")
    ap.add_argument("--json")
    args = ap.parse_args()
    lm = load_model(args.model, progress=False)
    model = lm.model
    prompt = mx.array([[100 + i % 1000 for i in range(args.context)]])
    cache, counted = model.make_cache(), model.make_cache()
    mx.eval(model(prompt, cache), model(prompt, counted))
    tok = mx.array([[1000]])
    mx.eval(model(tok, counted))  # the first step may grow the cache buffers (every 256 tokens)
    kinds = node_kinds(model(tok, counted))  # a step as decode runs it (cache already allocated)
    build, run = [], []
    profiled = native.enabled()
    if profiled:
        native.set_layer_profile(True)
        native.take_layer_profile()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        out = model(tok, cache)
        t1 = time.perf_counter()
        mx.eval(out)
        build.append(t1 - t0)
        run.append(time.perf_counter() - t1)
    fused = {}
    if profiled:
        native.set_layer_profile(False)
        fused = {k: v / args.steps for k, v in native.take_layer_profile().items()}
    levels = [m for _, m in model.named_modules() if isinstance(m, QuantLevel | RotQLevel)]
    xs = {c: mx.ones((1, 1, c)) for c in {lv.cols for lv in levels}}
    prod = []
    for _ in range(args.steps):
        outs = [lv(xs[lv.cols]) for lv in levels]
        t0 = time.perf_counter()
        mx.eval(outs)
        prod.append(time.perf_counter() - t0)
    # the vocabulary head on one token, as the step runs it last (split over the pool when large)
    head = model.embed_tokens.as_linear if getattr(model.args, "tie_word_embeddings", True) else model.lm_head
    h = mx.ones((1, 1, model.args.hidden_size))
    head_t = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        mx.eval(head(h))
        head_t.append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in (("build", build), ("eval", run), ("products", prod),
                                                      ("head", head_t))}  # fmt: skip
    ms["other"] = max(0.0, ms["eval"] - ms["products"])
    res = {
        "model": lm.name,
        "context": args.context,
        "path": describe(),
        "load_avg": list(os.getloadavg()),
        "ms_per_token": ms,
        "nodes_per_token": sum(kinds.values()),
        "nodes_by_kind": dict(kinds.most_common()),
        "product_levels": len(levels),
        "fused_layers_per_token": fused,
    }
    print(f"{lm.name}: {res['nodes_per_token']} graph nodes per token; top: {kinds.most_common(8)}")
    print(
        f"per token: build {ms['build']:.2f} ms (Python, overlapped in the generator), eval {ms['eval']:.2f} ms "
        f"= products {ms['products']:.2f} ms ({len(levels)} levels) + other {ms['other']:.2f} ms"
    )
    if fused.get("layers"):
        print(
            f"inside the {fused['layers']:.0f} fused layer nodes per token: products {fused['products']:.2f} ms "
            f"(shared over {describe().get('threads')} threads), attention {fused['attention']:.2f} ms, "
            f"norms/RoPE/activation/adds {fused['rest']:.2f} ms"
        )
        print(f"outside them: the vocabulary head alone {ms['head']:.2f} ms of the remaining "
              f"{ms['eval'] - fused['products'] - fused['attention'] - fused['rest']:.2f} ms")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
