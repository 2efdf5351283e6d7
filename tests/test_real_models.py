"""The built-in real models end to end (marked slow: each loads a real model)."""

from pathlib import Path

import pytest

from mmt_mlx.generate import generate
from mmt_mlx.loader import load_model
from mmt_mlx.perplexity import perplexity
from mmt_mlx.sample import SamplingParams

ALICE = Path(__file__).parent / "fixtures" / "alice29.txt"
# llama.cpp (llama-cpp-python 0.3.36, 2 threads) on the same text and rule: ../shared/notes/facts.md
LLAMA_CPP_PPL = {"smollm2-135m-instruct": 24.00, "gemma3-270m": 20.12}


def alice_text() -> str:
    text = ALICE.read_text(encoding="utf-8", errors="replace")
    return text[text.index("Alice was beginning") :]


@pytest.fixture(scope="module", params=sorted(LLAMA_CPP_PPL))
def dense_model(request):
    return load_model(request.param, dense=True)


@pytest.mark.slow
def test_dense_perplexity_matches_llama_cpp(dense_model):
    lm = dense_model
    ids = lm.tokenizer.encode(alice_text(), add_bos=False)
    r = perplexity(lm.model, ids, lm.tokenizer.bos_id, ctx=512, chunks=8)
    assert r.tokens == 8 * 511
    ref = LLAMA_CPP_PPL[lm.name]
    assert abs(r.ppl - ref) / ref < 0.01, f"{lm.name}: ppl {r.ppl:.3f} vs llama.cpp {ref}"


@pytest.mark.slow
def test_default_model_answers_a_chat_prompt():
    lm = load_model(None, dense=True)
    tok = lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(lm, prompt, 40, sampling=SamplingParams(temperature=0.0))
    assert "Paris" in out


@pytest.fixture(scope="module", params=sorted(LLAMA_CPP_PPL))
def fgs_model(request, tmp_path_factory):
    # A fresh cache: the built-in is converted at the default preset on first use, as a new user sees it.
    mp = pytest.MonkeyPatch()
    mp.setenv("MMT_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield load_model(request.param, progress=False)
    finally:
        mp.undo()


@pytest.mark.slow
def test_default_preset_keeps_quality_and_size(fgs_model):
    lm = fgs_model
    assert lm.info["format"] == "fgs"
    assert lm.info["stored_bytes"] <= lm.info["source_bytes"]  # no more than the source GGUF's weights
    ids = lm.tokenizer.encode(alice_text(), add_bos=False)
    r = perplexity(lm.model, ids, lm.tokenizer.bos_id, ctx=512, chunks=8)
    ref = LLAMA_CPP_PPL[lm.name]
    assert r.ppl < ref * 1.05, f"{lm.name}: FGS ppl {r.ppl:.3f} vs source {ref}"
