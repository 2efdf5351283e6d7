"""The mmt command: output, JSON, and one-line errors with a non-zero exit for bad input."""

import json
from pathlib import Path

import pytest

from mmt_mlx.cli import main

ALICE = str(Path(__file__).parent / "fixtures" / "alice29.txt")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_and_reports_speed(capsys, tiny_gguf):
    path, _ = tiny_gguf["llama"]
    code, out, err = run(
        capsys, "generate", "-m", path, "-n", "12", "--seed", "3", "--temp", "0.8", "Once upon"
    )
    assert code == 0 and out.strip()
    assert "prompt:" in err and "tok/s" in err and "decode: 12 tokens" in err
    code2, out2, _ = run(
        capsys, "generate", "-m", path, "-n", "12", "--seed", "3", "--temp", "0.8", "Once upon"
    )
    assert out2 == out  # same seed, same text


def test_chat_generation_uses_template(capsys, tiny_gguf):
    path, _ = tiny_gguf["llama"]
    code, out, err = run(capsys, "generate", "-m", path, "--chat", "-n", "5", "--temp", "0", "Hi")
    assert code == 0
    assert "prompt: " in err  # the chat template makes the prompt longer than the bare text
    assert int(err.split("prompt: ")[1].split(" ")[0]) > 10


def test_eval_ppl_json(capsys, tiny_gguf):
    path, _ = tiny_gguf["gemma3"]
    code, out, _ = run(
        capsys, "eval", "ppl", "-m", path, "--text", ALICE, "--ctx", "64", "--chunks", "2", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["tokens"] == 2 * 63 and report["ppl"] > 1


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_eval_ppl_per_token_scores_the_decode_path(capsys, tiny_gguf, arch):
    """--per-token feeds one token per step through the cache (the decode path: integer kernels and fused
    layers on the CPU); it scores the same tokens as the prompt path, to within that path's rounding."""
    path, _ = tiny_gguf[arch]
    argv = ["eval", "ppl", "-m", path, "--text", ALICE, "--ctx", "48", "--chunks", "2", "--json"]
    _, out, _ = run(capsys, *argv)
    code, out_step, _ = run(capsys, *argv, "--per-token")
    assert code == 0
    prompt, step = json.loads(out), json.loads(out_step)
    assert step["per_token"] and not prompt["per_token"] and step["tokens"] == prompt["tokens"] == 2 * 47
    assert step["ppl"] == pytest.approx(prompt["ppl"], rel=1e-4)


def test_per_token_perplexity_feeds_one_token_per_call():
    """perplexity(per_token=True) calls the model once per token with a one-token input and a cache that grows,
    and scores the tokens as the whole-chunk call does (a tiny dense model: both paths are MLX ops)."""
    from mmt_mlx.perplexity import perplexity
    from mmt_mlx.testing import tiny_model

    model = tiny_model("gemma3").model  # sliding-window layers too
    calls: list[tuple[int, int]] = []

    class Counting:
        def make_cache(self):
            return model.make_cache()

        def __call__(self, tokens, cache):
            calls.append((tokens.shape[1], cache[0].offset))
            return model(tokens, cache)

    ids = [(7 * i + 3) % 97 for i in range(60)]
    whole = perplexity(Counting(), ids, 1, ctx=21, chunks=2)
    assert calls == [(20, 0), (20, 0)]
    calls.clear()
    step = perplexity(Counting(), ids, 1, ctx=21, chunks=2, per_token=True)
    assert calls == [(1, i) for i in range(20)] * 2
    assert step.tokens == whole.tokens == 40
    assert step.ppl == pytest.approx(whole.ppl, rel=1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "-m", "no-such-model", "hi"], "unknown model 'no-such-model'"),
        (["generate", "-m", "/no/such/file.gguf", "hi"], "not found"),
        (["generate", "   "], "the prompt is empty"),
        (["generate", "--temp", "-1", "hi"], "temperature"),
        (["eval", "ppl", "--text", "/no/such/text.txt"], "cannot read text file"),
    ],
)
def test_bad_input_is_one_line_error(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_corrupt_file_and_too_long_prompt(capsys, tmp_path, tiny_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    code, _, err = run(capsys, "generate", "-m", str(bad), "hi")
    assert code == 1 and "bad.gguf" in err and len(err.strip().splitlines()) == 1
    path, _ = tiny_gguf["llama"]
    code, _, err = run(capsys, "generate", "-m", path, "word " * 400)
    assert code == 1 and "context is 256 tokens" in err
