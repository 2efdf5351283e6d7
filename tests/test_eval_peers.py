"""llama.cpp peers and converted FGS directories in ``mmt eval frontier`` (tiny random models).

The llama.cpp test needs the optional llama-cpp-python (``mmt_mlx[llamacpp]``, a 20-minute source build, so
not in the README's test command); the rest runs everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pytest

from mmt_mlx.bench.accounting import gguf_weight_bytes
from mmt_mlx.build import model_from_source
from mmt_mlx.errors import MmtError
from mmt_mlx.evals.cli import add_eval_parsers
from mmt_mlx.evals.frontier import frontier
from mmt_mlx.evals.llamacpp_peers import chunk_nll, parse_llama_types
from mmt_mlx.fgs_cache import fgs_model_path
from mmt_mlx.locate import load_source
from mmt_mlx.perplexity import perplexity

TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_chunk_nll_is_the_log_softmax_sum():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)).astype(np.float32) * 30  # large logits: the max shift matters
    targets = [3, 0, 10, 7, 7]
    lp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    assert chunk_nll(logits, targets) == pytest.approx(
        -sum(lp[i, t] for i, t in enumerate(targets)), rel=1e-12
    )


def test_parse_llama_types():
    assert parse_llama_types(" q4_k_m,IQ4_XS ,") == ["Q4_K_M", "IQ4_XS"]
    with pytest.raises(MmtError, match="unknown llama.cpp type 'Q9_K'"):
        parse_llama_types("Q4_K_M,Q9_K")


def test_frontier_scores_converted_dirs(tiny_gguf, cache, tmp_path):
    path, _ = tiny_gguf["llama"]
    _, fgs_dir = fgs_model_path(path, "small", progress=False)
    r = frontier(path, TEXT, presets=["small"], mlx_bits=[], ctx=32, chunks=2, progress=False,
                 fgs_dirs=[str(fgs_dir)])  # fmt: skip
    by_kind = {p["kind"]: p for p in r["points"]}
    # the same directory scored as a preset and as a directory: same bytes, same perplexity
    assert by_kind["fgs-dir"]["stored_bytes"] == by_kind["fgs"]["stored_bytes"]
    assert by_kind["fgs-dir"]["ppl"] == pytest.approx(by_kind["fgs"]["ppl"], rel=1e-6)
    with pytest.raises(MmtError, match="not an FGS model directory"):
        frontier(
            path, TEXT, presets=[], mlx_bits=[], ctx=32, chunks=2, progress=False, fgs_dirs=[str(tmp_path)]
        )
    parser = argparse.ArgumentParser()
    add_eval_parsers(parser.add_subparsers())
    a = parser.parse_args(["frontier", "-m", path, "--text", "x.txt"])
    assert a.llama_types == "auto" and a.fgs_dirs == ""


def test_llamacpp_requantized_points(tiny_gguf, tmp_path):
    pytest.importorskip("llama_cpp", reason="optional dependency: pip install 'mmt_mlx[llamacpp]'")
    from mmt_mlx.evals.llamacpp_peers import llamacpp_perplexity, llamacpp_points

    path, _ = tiny_gguf["llama"]
    name, src = load_source(path)
    ids = src.tokenizer.encode(TEXT, add_bos=False)
    bos = src.tokenizer.bos_id
    ours = perplexity(model_from_source(src, name).model, ids, bos, ctx=32, chunks=2)
    theirs = llamacpp_perplexity(path, ids, bos, ctx=32, chunks=2)
    assert theirs.tokens == ours.tokens == 62
    assert theirs.ppl == pytest.approx(ours.ppl, rel=1e-3)  # same chunks, same scored tokens, same weights
    params = int(sum(v.size for v in src.weights.values()))
    pts = llamacpp_points(path, ["Q8_0", "Q2_K"], ids, bos, params, ctx=32, chunks=2)
    assert [p["label"] for p in pts] == ["llama.cpp Q8_0", "llama.cpp Q2_K"]
    q8, q2 = pts
    assert (
        q2["stored_bytes"] < q8["stored_bytes"] < src.weight_bytes == gguf_weight_bytes(path)["stored_bytes"]
    )
    assert q8["ppl"] == pytest.approx(ours.ppl, rel=0.05)  # 8 bits barely move a random model
    assert q2["ppl"] != q8["ppl"] and all(p["bits_per_weight"] < 32 for p in pts)


def test_eval_kl_of_a_converted_dir(tiny_gguf, cache, tmp_path, capsys, monkeypatch):
    path, _ = tiny_gguf["llama"]
    _, fgs_dir = fgs_model_path(path, "small", progress=False)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    parser = argparse.ArgumentParser()
    add_eval_parsers(parser.add_subparsers())
    common = ["-m", path, "--text", str(text), "--ctx", "32", "--chunks", "2", "--json"]
    out = []
    for extra in (["--preset", "small"], ["--candidate", str(fgs_dir)]):
        a = parser.parse_args(["kl", *common, *extra])
        assert a.func(a) == 0
        out.append(json.loads(capsys.readouterr().out))
    # -m DIR alone: the directory against the model it was converted from (its manifest names the GGUF file,
    # found from its folder), not against itself; elsewhere that name resolves to nothing: a clear error
    a = parser.parse_args(["kl", "-m", str(fgs_dir), *common[2:]])
    with pytest.raises(MmtError, match="converted from 'tiny-llama.gguf'"):
        a.func(a)
    monkeypatch.chdir(os.path.dirname(path))
    a = parser.parse_args(["kl", "-m", str(fgs_dir), *common[2:]])
    assert a.func(a) == 0
    out.append(json.loads(capsys.readouterr().out))
    assert out[0]["kl"] == pytest.approx(out[1]["kl"], rel=1e-6) and out[1]["kl"] > 0
    assert out[2]["kl"] == pytest.approx(out[1]["kl"], rel=1e-6)
    assert out[1]["candidate"] == out[2]["candidate"] == str(fgs_dir)
    for bad, msg in ((["--candidate", str(tmp_path)], "not an FGS model directory"),
                     (["--candidate", str(fgs_dir), "--preset", "small"], "not both")):  # fmt: skip
        a = parser.parse_args(["kl", *common, *bad])
        with pytest.raises(MmtError, match=msg):
            a.func(a)
    for bad, msg in ((["--preset", "small"], "names an FGS directory"),):
        a = parser.parse_args(["kl", "-m", str(fgs_dir), *common[2:], *bad])
        with pytest.raises(MmtError, match=msg):
            a.func(a)
    # a directory whose manifest names no source is an error, not a comparison with the default model
    unnamed = tmp_path / "unnamed"
    shutil.copytree(fgs_dir, unnamed)
    manifest = json.loads((unnamed / "manifest.json").read_text())
    manifest["report"]["source"] = None
    (unnamed / "manifest.json").write_text(json.dumps(manifest))
    a = parser.parse_args(["kl", "-m", str(unnamed), *common[2:]])
    with pytest.raises(MmtError, match="converted from ''"):
        a.func(a)
