"""mmt bench and mmt eval kl/frontier on tiny models: the arithmetic, end to end runs, KL sanity. No timings
are asserted (the machine is shared)."""

from __future__ import annotations

import argparse
import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mmt_mlx.bench import timing
from mmt_mlx.bench.accounting import gguf_weight_bytes, weight_bytes
from mmt_mlx.bench.cli import add_bench_parser
from mmt_mlx.bench.run import run_bench
from mmt_mlx.bench.stats import APPLE_CHIPS, apple_estimates, bench_stats, mean_std
from mmt_mlx.evals.cli import add_eval_parsers
from mmt_mlx.evals.frontier import frontier
from mmt_mlx.evals.kl import kl_eval
from mmt_mlx.testing import TINY_CONFIGS, tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_mean_std_and_rates():
    assert mean_std([]) == (0.0, 0.0)
    assert mean_std([3.0]) == (3.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)  # sample std, as llama-bench
    r = bench_stats([0.5, 1.0], [2.0, 4.0], prompt_tokens=100, gen_tokens=8, stored_bytes=1000,
                    bytes_per_token=1e6, flops_per_token=2e6)  # fmt: skip
    assert r["pp"]["tok_s"] == pytest.approx(150.0)  # mean of 200 and 100 tok/s
    assert r["pp"]["std"] == pytest.approx(math.sqrt(5000))
    assert r["tg"]["tok_s"] == pytest.approx(3.0)  # mean of 4 and 2 tok/s
    assert r["bandwidth_gbs"] == pytest.approx(1e6 * 3.0 / 1e9)
    assert r["apple_bytes_per_token"] == 1e6  # defaults to the measured layout


def test_apple_estimates_bandwidth_and_compute_bounds():
    bw, peak = APPLE_CHIPS["M4"]
    e = apple_estimates(1e8, 1e6)
    assert e["M4"]["tok_s"] == pytest.approx(bw / 1e8) and e["M4"]["bound"] == "bandwidth"
    e = apple_estimates(1.0, 1e12)  # absurd FLOPs: compute becomes the ceiling
    assert e["M4"]["tok_s"] == pytest.approx(peak / 1e12) and e["M4"]["bound"] == "compute"
    assert apple_estimates(1e8, 1e6)["M4 Pro"]["tok_s"] > apple_estimates(1e8, 1e6)["M4"]["tok_s"]


def test_weight_bytes_dense_tiny_model():
    lm = tiny_model("llama")
    cfg = TINY_CONFIGS["llama"]
    v, h, f = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    emb = v * h * 4
    from mlx.utils import tree_flatten

    total = sum(a.nbytes for _, a in tree_flatten(lm.model.parameters()))
    w = weight_bytes(lm.model)
    assert w["stored_bytes"] == total
    # tied: every weight once, the table once more as the head, minus nothing but plus one looked-up row
    assert w["bytes_per_token"] == pytest.approx(total + emb / v)
    assert w["apple_bytes_per_token"] == pytest.approx((total + emb / v) / 2)  # f32 -> bf16
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f  # q, o; k, v; gate, up, down
    assert w["flops_per_token"] == 2 * (cfg["num_hidden_layers"] * per_layer + v * h)
    with_attn = weight_bytes(lm.model, attention_ctx=10)["flops_per_token"]
    assert with_attn - w["flops_per_token"] == 4 * cfg["num_hidden_layers"] * h * 10


def test_weight_bytes_mlx_quantized_counts_half_scales():
    lm = tiny_model("llama")
    dense = weight_bytes(lm.model)
    nn.quantize(lm.model, group_size=64, bits=4)
    w = weight_bytes(lm.model)
    cfg = TINY_CONFIGS["llama"]
    emb = cfg["vocab_size"] * cfg["hidden_size"] * 4.5 / 8  # 4 bits + f16 scale and bias per 64 weights
    assert w["bytes_per_token"] >= emb  # the tied head reads the whole table
    assert w["stored_bytes"] == pytest.approx(dense["stored_bytes"] * 4.5 / 32, rel=0.02)  # norms stay f32
    assert w["bytes_per_token"] == pytest.approx(w["apple_bytes_per_token"], rel=1e-3)  # norms: f32 vs bf16
    assert w["flops_per_token"] == dense["flops_per_token"]


def test_gguf_weight_bytes(tiny_gguf):
    path, weights = tiny_gguf["llama"]
    w = gguf_weight_bytes(path)
    total = sum(a.nbytes for a in weights.values())  # F32 tensors
    emb = weights["embed_tokens.weight"]
    assert w["stored_bytes"] == total
    assert w["bytes_per_token"] == pytest.approx(total + emb.nbytes / emb.shape[0])


def test_kl_self_is_zero_and_perturbed_positive():
    lm = tiny_model("llama")
    ids = np.random.default_rng(1).integers(1000, 40000, size=200).tolist()
    r = kl_eval(lm, lm, ids, ctx=32, chunks=3, bos=1)
    assert r.kl == pytest.approx(0.0, abs=1e-6) and r.top1_agreement == 1.0
    assert r.tokens == 3 * 31 and r.ppl_candidate == pytest.approx(r.ppl_reference)
    other = tiny_model("llama")
    w = other.model.layers[0].mlp.down_proj.weight
    other.model.layers[0].mlp.down_proj.weight = w + 0.5 * mx.random.normal(w.shape, key=mx.random.key(0))
    r2 = kl_eval(other, lm, ids, ctx=32, chunks=3)  # no BOS: plain chunks of ctx
    assert r2.kl > 1e-4 and r2.tokens == 3 * 31


def test_run_bench_tiny_gguf_end_to_end(tiny_gguf, cache, tmp_path, capsys):
    path, _ = tiny_gguf["llama"]
    r = run_bench(path, prompt_tokens=16, gen_tokens=4, reps=2, compare=True, progress=False)
    keys = [v["key"] for v in r["variants"]]
    assert keys[:4] == ["fgs", "dense", "mlx-q8", "mlx-q4"]
    for v in r["variants"]:
        assert v["pp"]["tok_s"] > 0 and v["tg"]["tok_s"] > 0 and len(v["tg"]["seconds"]) == 2
        assert v["stored_bytes"] > 0 and v["bytes_per_token"] > 0 and v["apple"]["M4"]["tok_s"] > 0
    by = {v["key"]: v for v in r["variants"]}
    assert by["mlx-q4"]["stored_bytes"] < by["mlx-q8"]["stored_bytes"] < by["dense"]["stored_bytes"]
    assert by["fgs"]["peak_memory"] > 0
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert r["timing"] == "each variant alone" and "llama.cpp" not in by
    else:  # the source is a GGUF: llama.cpp ran, its reps alternating with the FGS model's
        assert r["timing"] == "FGS and llama.cpp reps alternating" and keys[-1] == "llama.cpp"
    # the CLI: table, JSON file and JSON on stdout
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    out = tmp_path / "b.json"
    a = parser.parse_args(
        ["bench", "-m", path, "-p", "8", "-g", "2", "-r", "1", "--no-compare", "--json", str(out)]
    )
    assert a.func(a) == 0
    assert "FGS" in capsys.readouterr().out
    assert [v["key"] for v in json.loads(out.read_text())["variants"]] == ["fgs"]


def test_frontier_tiny(tiny_gguf, cache, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = tiny_gguf["llama"]
    text = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 20
    png = tmp_path / "f.png"
    r = frontier(
        path, text, presets=["small"], mlx_bits=[4], out_png=str(png), ctx=32, chunks=2, progress=False
    )
    kinds = [p["kind"] for p in r["points"]]
    assert sorted(kinds) == ["dense", "fgs", "mlx", "source"]
    assert all(p["ppl"] > 0 and p["stored_bytes"] > 0 for p in r["points"])
    assert png.stat().st_size > 1000
    # the CLI parsers register and parse
    parser = argparse.ArgumentParser()
    add_eval_parsers(parser.add_subparsers())
    a = parser.parse_args(["kl", "-m", path, "--text", "x.txt", "--ctx", "64"])
    assert a.ctx == 64 and a.chunks == 4
    a = parser.parse_args(["frontier", "-m", path, "--text", "x.txt", "--presets", "small"])
    assert a.presets == "small" and a.out == "frontier.png"


def test_alternating_timers_take_turns(monkeypatch):
    """Round by round: every engine's prompt pass, then every engine's decode, each after a settle pause."""
    monkeypatch.setattr(timing, "SETTLE_S", 0.0)
    calls: list[str] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def warm_up(self) -> None:
            calls.append(f"{self.name}:warm")

        def pp(self) -> float:
            calls.append(f"{self.name}:pp")
            return 1.0 if self.name == "a" else 2.0

        def tg(self) -> float:
            calls.append(f"{self.name}:tg")
            return 3.0 if self.name == "a" else 4.0

    out = timing.time_alternating([Fake("a"), Fake("b")], reps=2)
    assert out == [([1.0, 1.0], [3.0, 3.0]), ([2.0, 2.0], [4.0, 4.0])]
    assert calls == ["a:warm", "b:warm"] + ["a:pp", "b:pp", "a:tg", "b:tg"] * 2
