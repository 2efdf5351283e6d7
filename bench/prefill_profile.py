"""Where a prompt's time goes on the CPU: the prefill timed whole, then per kind of module.

    python bench/prefill_profile.py [-m MODEL] [-p 256] [--rounds 2] [--json FILE]

The prompt runs as the generator's prefill does (its cache filled, no logits: the vocabulary head is left out).
Then each product level, linear layer, attention, norm, RoPE and activation is timed by evaluating its inputs
before it and its output after it; that serializes the graph, so the parts add up to somewhat more than the
whole, and the containers (``Attention``, ``MLP``, ``FGSLinear``) include their parts. The last round is
reported.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

# isort: off
import mmt_mlx  # noqa: F401  (BLAS preload before mlx)
import mlx.core as mx

from mmt_mlx.fgs.runtime import layers as fgs_layers
from mmt_mlx.loader import load_model
from mmt_mlx.models import base, gemma3, llama
from mmt_mlx.native import describe
# isort: on

times: collections.Counter = collections.Counter()
counts: collections.Counter = collections.Counter()


def _evaluated(args) -> None:
    mx.eval([a for a in args if isinstance(a, mx.array)])


def _timed(label, fn, skip=lambda args: False):
    def run(*args, **kwargs):
        if skip(args):  # left lazy: nothing evaluates it (the vocabulary head)
            return fn(*args, **kwargs)
        _evaluated(args)
        t = time.perf_counter()
        y = fn(*args, **kwargs)
        mx.eval(y)
        key = label(args) if callable(label) else label
        times[key] += time.perf_counter() - t
        counts[key] += 1
        return y

    return run


def instrument(mod, vocab: int) -> None:
    """Wrap the module kinds of one architecture (and the shared levels and helpers) with timers; products with
    ``vocab`` rows (the head, whose logits the prefill never evaluates) stay untimed and lazy."""
    for cls in (fgs_layers.QuantLevel, fgs_layers.GaussianLevel):
        call = cls.__call__
        cls.__call__ = _timed(
            lambda a, c=cls: f"{c.__name__} {getattr(a[0], 'bits', '')}".rstrip(),
            call,
            skip=lambda a: a[0].rows >= vocab,
        )
    lin = fgs_layers.FGSLinear.__call__
    fgs_layers.FGSLinear.__call__ = _timed(
        lambda a: f"FGSLinear {a[0].out_features}x{a[0].in_features}, {len(a[0].levels)} level(s)", lin
    )
    for cls_name in ("Attention", "MLP", "RMSNorm"):
        cls = getattr(mod, cls_name, None)
        if cls is not None:
            cls.__call__ = _timed(f"{cls_name} (whole)" if cls_name != "RMSNorm" else "RMSNorm", cls.__call__)
    base.RoPE.__call__ = _timed("RoPE", base.RoPE.__call__)
    mod.cached_attention = _timed("cached_attention (cache, RoPE, attention)", mod.cached_attention)
    if hasattr(mod, "gated_activation"):
        mod.gated_activation = _timed("gated_activation", mod.gated_activation)


def prefill_seconds(lm, prompt: list[int]) -> float:
    cache = lm.model.make_cache()
    t = time.perf_counter()
    lm.model(mx.array(prompt)[None], cache)
    mx.eval([c.state for c in cache])
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    lm = load_model(args.model, progress=False)
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 200)[: args.prompt_tokens]
    whole = min(prefill_seconds(lm, prompt) for _ in range(args.rounds + 1))
    instrument(gemma3 if isinstance(lm.model, gemma3.Model) else llama, lm.model.args.vocab_size)
    for _ in range(args.rounds):
        times.clear()
        counts.clear()
        prefill_seconds(lm, prompt)
    print(f"{lm.name}: {len(prompt)}-token prefill {whole * 1e3:.1f} ms ({len(prompt) / whole:.1f} tok/s), "
          f"{describe().get('isa', 'MLX ops')}")  # fmt: skip
    for key, sec in times.most_common():
        print(f"  {key:46s} {sec * 1e3:8.1f} ms  x{counts[key]}")
    if args.json:
        report = {"model": lm.name, "prompt_tokens": len(prompt), "prefill_ms": whole * 1e3,
                  "parts_ms": {k: v * 1e3 for k, v in times.items()}, "calls": dict(counts)}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
