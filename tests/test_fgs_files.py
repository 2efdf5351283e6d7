"""Bad FGS model directories fail with one clear error naming the file (manifest unreadable or malformed, a
wrong format version, codes that match no layer of the model), through the loader, the bench and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from mmt_mlx.bench.run import comparison_source
from mmt_mlx.build import load_fgs
from mmt_mlx.cli import main
from mmt_mlx.convert import convert
from mmt_mlx.errors import ModelFormatError
from mmt_mlx.fgs import format as fgs_format
from mmt_mlx.loader import load_model
from mmt_mlx.locate import load_source
from mmt_mlx.registry import DEFAULT_MODEL


@pytest.fixture(scope="module")
def fgs_dir(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("fgs") / "tiny"
    _, src = load_source(tiny_gguf["llama"][0])
    convert(src, out, tau=1e-2, calibrate=False, progress=False, source_name="smollm2-135m-instruct")
    return out


@pytest.fixture
def copy(fgs_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(fgs_dir, bad)
    return bad


def _manifest(path) -> dict:
    return json.loads((path / fgs_format.MANIFEST).read_text())


def _write(path, manifest: dict) -> None:
    (path / fgs_format.MANIFEST).write_text(json.dumps(manifest))


def test_the_copy_loads(copy):
    assert load_model(str(copy)).info["format"] == "fgs"
    assert fgs_format.read_manifest(copy)["arch"] == "llama"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00garbage", b""],
    ids=["invalid-json", "not-utf8", "empty"],
)
def test_unreadable_manifest(copy, content, capsys):
    (copy / fgs_format.MANIFEST).write_bytes(content)
    with pytest.raises(ModelFormatError, match=r"manifest.json: unreadable manifest"):
        load_model(str(copy))
    with pytest.raises(ModelFormatError, match=r"manifest.json: unreadable manifest"):
        comparison_source(str(copy))  # the bench reads manifests through fgs/format.py too
    assert main(["generate", "-m", str(copy), "-n", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unreadable manifest" in err and "Traceback" not in err


def test_manifest_that_is_a_directory(copy):
    (copy / fgs_format.MANIFEST).unlink()
    (copy / fgs_format.MANIFEST).mkdir()
    with pytest.raises(ModelFormatError, match="unreadable manifest"):
        fgs_format.read_manifest(copy)


def test_not_an_fgs_manifest(fgs_dir, copy):
    _write(copy, ["a", "list"])
    with pytest.raises(ModelFormatError, match="not an FGS model manifest"):
        load_model(str(copy))
    m = _manifest(fgs_dir)
    del m["format"]
    _write(copy, m)
    with pytest.raises(ModelFormatError, match="not an FGS model manifest"):
        load_model(str(copy))


def test_version_1_files_still_load(fgs_dir, copy):
    """Version 2 only added the rotq level's log-scale codes: a version-1 file (f16 scales) loads as before."""
    m = _manifest(fgs_dir)
    assert m["format_version"] == fgs_format.FORMAT_VERSION == 2
    m["format_version"] = 1
    _write(copy, m)
    assert load_model(str(copy)).model is not None


@pytest.mark.parametrize("version", [fgs_format.ROW_BANDS_VERSION + 1, 0, None, "1"])
def test_wrong_format_version(fgs_dir, copy, version, capsys):
    m = _manifest(fgs_dir)
    m["format_version"] = version
    _write(copy, m)
    with pytest.raises(ModelFormatError, match=f"format version {version!r} \\(this mmt reads 1, 2, 3, 4\\)"):
        load_model(str(copy))
    assert main(["bench", "-m", str(copy), "-p", "1", "-g", "1", "-r", "1"]) == 1
    assert "format version" in capsys.readouterr().err


@pytest.mark.parametrize("drop", ["tensors", "raw", "arch", "config", "tokenizer"])
def test_malformed_manifest(fgs_dir, copy, drop):
    m = _manifest(fgs_dir)
    del m[drop]
    _write(copy, m)
    with pytest.raises(ModelFormatError, match=f"manifest.json: malformed manifest \\('{drop}' missing"):
        load_model(str(copy))


def test_config_that_does_not_fit_the_architecture(fgs_dir, copy, capsys):
    m = _manifest(fgs_dir)
    m["config"]["no_such_key"] = 1
    _write(copy, m)
    with pytest.raises(ModelFormatError, match="config does not fit the llama architecture"):
        load_model(str(copy))
    m["arch"] = "mamba"
    _write(copy, m)
    assert main(["generate", "-m", str(copy), "hi"]) == 1
    assert "unsupported architecture 'mamba'" in capsys.readouterr().err


def test_malformed_tensor_entry(fgs_dir, copy):
    m = _manifest(fgs_dir)
    name = next(iter(m["tensors"]))
    m["tensors"][name]["levels"] = 7
    _write(copy, m)
    with pytest.raises(ModelFormatError, match="malformed manifest"):
        load_model(str(copy))


def test_codes_that_match_no_layer(fgs_dir, copy):
    m = _manifest(fgs_dir)
    name = next(k for k in m["tensors"] if k.startswith("layers.0."))
    m["tensors"][name.replace("layers.0.", "layers.99.")] = m["tensors"][name]  # a layer the model lacks
    _write(copy, m)
    with pytest.raises(ModelFormatError, match="1 coded tensors match no layer of the model"):
        load_fgs(copy, "bad")


def test_codes_missing_for_a_layer(fgs_dir, copy):
    m = _manifest(fgs_dir)
    del m["tensors"][next(k for k in m["tensors"] if k.startswith("layers.0."))]
    _write(copy, m)
    with pytest.raises(
        ModelFormatError, match=r"no code or tensor for 1 weights of the model \(first: layers\.0\."
    ):
        load_fgs(copy, "bad")


def test_bench_compares_the_default_model_without_an_argument(fgs_dir):
    assert comparison_source(None) == DEFAULT_MODEL
    assert comparison_source(str(fgs_dir)) == DEFAULT_MODEL  # an FGS model of a built-in: that built-in
