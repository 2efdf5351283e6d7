"""Arithmetic on bench timings: mean and spread as llama-bench reports them, and the Apple Silicon estimate."""

from __future__ import annotations

import math

APPLE_CHIPS: dict[str, tuple[float, float]] = {"M4": (120e9, 4.3e12), "M4 Pro": (273e9, 8.6e12)}


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
