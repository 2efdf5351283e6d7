"""mmt convert end to end on tiny GGUF models: the FGS format, its checks, atomic writes, the on-the-fly path."""

import json
from pathlib import Path

import mlx.core as mx
import pytest

from mmt_mlx.build import build_model, load_fgs
from mmt_mlx.cli import main
from mmt_mlx.convert import convert
from mmt_mlx.errors import ModelFormatError
from mmt_mlx.fgs import format as fgs_format
from mmt_mlx.fgs.codec import decode_tensor
from mmt_mlx.loader import load_model
from mmt_mlx.locate import load_source
from mmt_mlx.perplexity import perplexity

ALICE = Path(__file__).parent / "fixtures" / "alice29.txt"


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("fgs") / "tiny-llama-fgs"
    _, src = load_source(tiny_gguf["llama"][0])
    report = convert(src, out, tau=2e-3, progress=False)
    return out, src, report


def test_report_and_stored_bytes(converted):
    out, src, report = converted
    manifest, codes, raw = fgs_format.load_fgs_model(out)
    assert set(codes) == {k for k, v in src.weights.items() if v.ndim == 2}
    assert set(raw) == {k for k, v in src.weights.items() if v.ndim == 1}
    stored = sum(a.nbytes for tc in codes.values() for lv in tc.levels for a in _arrays(lv))
    assert report["coded_bytes"] == stored
    for _name, tc in codes.items():
        assert tc.errors[-1] <= 2e-3  # every tensor meets its target (activation-weighted error)
    assert report["bits_per_weight"] < 16


def _arrays(level):
    fields = {
        "quant": ("wq", "scales", "biases"),
        "circulant": ("spec_re", "spec_im"),
        "gaussian": ("mu", "sidx", "perm"),
    }
    out = [getattr(level, f) for f in fields[level.kind] if getattr(level, f) is not None]
    if level.kind == "gaussian":
        amp = level.amp
        out += list(amp.arrays.values()) if hasattr(amp, "arrays") else [amp]
    return out


def test_on_the_fly_equals_reference_decode(converted):
    out, src, _ = converted
    lm = load_fgs(out, "fgs")
    _, codes, raw = fgs_format.load_fgs_model(out)
    ref = build_model(src.arch, src.config)
    weights = {k: mx.array(decode_tensor(tc)) for k, tc in codes.items()} | {
        k: mx.array(v) for k, v in raw.items()
    }
    ref.load_weights(list(weights.items()))
    ids = lm.tokenizer.encode(ALICE.read_text(encoding="utf-8", errors="replace")[:6000], add_bos=False)
    p_fly = perplexity(lm.model, ids, lm.tokenizer.bos_id, ctx=64, chunks=4).ppl
    p_ref = perplexity(ref, ids, lm.tokenizer.bos_id, ctx=64, chunks=4).ppl
    assert abs(p_fly - p_ref) / p_ref < 1e-3


def test_fgs_model_generates_through_cli(converted, capsys):
    out, _, _ = converted
    assert main(["generate", "-m", str(out), "-n", "6", "--seed", "1", "Hello"]) == 0
    assert "decode: 6 tokens" in capsys.readouterr().err


def test_corrupted_truncated_and_mismatched_files(converted, tmp_path):
    import shutil

    out, _, _ = converted
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    codes_file = bad / fgs_format.CODES
    data = bytearray(codes_file.read_bytes())
    data[-100] ^= 0xFF  # flip bits in the last array's data
    codes_file.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"codes.safetensors, tensor .*corrupted"):
        load_model(str(bad))
    codes_file.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelFormatError, match="codes.safetensors"):
        load_model(str(bad))
    shutil.copy(out / fgs_format.CODES, codes_file)
    manifest = json.loads((bad / fgs_format.MANIFEST).read_text())
    name = next(iter(manifest["tensors"]))
    manifest["tensors"][name]["levels"][0]["arrays"]["scales"]["shape"][0] += 1
    (bad / fgs_format.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match=f"tensor {name}"):
        load_model(str(bad))


def test_interrupted_write_leaves_nothing(tmp_path, converted, monkeypatch):
    _, src, _ = converted
    out = tmp_path / "never"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, tau=1e-2, calibrate=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_json_and_errors(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf["gemma3"]
    out = tmp_path / "g"
    assert main(["convert", path, "-o", str(out), "--preset", "small", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "gemma3" and report["heldout_ppl"] > 1 and report["stored_bytes"] > 0
    assert report["grid_search"] is False and report["preset"] == "small"
    # the tiny preset searches each quant group's grid, and stores fewer bytes than small
    assert main(["convert", path, "-o", str(tmp_path / "t"), "--preset", "tiny", "--json", "--no-eval"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert tiny["grid_search"] is True and tiny["tau"] == 3e-2
    assert tiny["stored_bytes"] < report["stored_bytes"]
    assert not any(
        k.startswith("q2") for c in tiny["classes"].values() for k in c["levels"]
    )  # no 2-bit codes
    assert main(["convert", path, "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", path, "-o", str(tmp_path / "x"), "--preset", "huge"]) == 1
    assert "unknown preset" in capsys.readouterr().err
    assert main(["convert", path, "-o", str(tmp_path / "y"), "--levels", "gaussian"]) == 1
    assert "including quant" in capsys.readouterr().err
