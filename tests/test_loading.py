"""Loading GGUF files and Hugging Face directories; bad files give one clear error."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from mmt_mlx.build import build_model
from mmt_mlx.errors import ModelFormatError, ModelNotFoundError
from mmt_mlx.loader import load_model
from mmt_mlx.testing import TINY_CONFIGS


def reference_logits(arch, weights, tokens):
    model = build_model(arch, TINY_CONFIGS[arch])
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return np.array(model(mx.array([tokens])))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_conventions_are_undone(tiny_gguf, arch):
    # The file stores permuted Llama Q/K rows and Gemma's 1 + w norms; the loaded model must equal the original.
    path, weights = tiny_gguf[arch]
    lm = load_model(path)
    assert lm.arch == arch and lm.context_length == 256
    tokens = [1, 50, 300, 7, 9000, 12]
    np.testing.assert_allclose(np.array(lm.model(mx.array([tokens]))), reference_logits(arch, weights, tokens),
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    assert lm.tokenizer.encode("Hello world", add_bos=False) == [19556, 905]


def test_hf_directory(tmp_path, tiny_gguf):
    _, weights = tiny_gguf["llama"]
    c = TINY_CONFIGS["llama"]
    config = {"model_type": "llama", "hidden_size": c["hidden_size"], "num_hidden_layers": c["num_hidden_layers"],
              "intermediate_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
              "num_key_value_heads": c["num_key_value_heads"], "vocab_size": c["vocab_size"],
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
              "max_position_embeddings": 256}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({f"model.{k}": v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    # tokenizer.json: SmolLM2's byte-level BPE, as the tokenizers library writes it
    from mmt_mlx.gguf_file import read_gguf_metadata
    from mmt_mlx.registry import builtin_path
    from mmt_mlx.tokenizer import _gguf_bpe

    meta = read_gguf_metadata(builtin_path("smollm2-135m-instruct"))
    _gguf_bpe(meta, meta["tokenizer.ggml.tokens"]).save(str(tmp_path / "tokenizer.json"))
    lm = load_model(str(tmp_path))
    assert lm.tokenizer.encode("Hello world", add_bos=False) == [19556, 905]
    tokens = [3, 4, 5]
    np.testing.assert_allclose(np.array(lm.model(mx.array([tokens]))), reference_logits("llama", weights, tokens),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_unknown_name_and_missing_file():
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model("/nonexistent/model.gguf")


def test_truncated_gguf(tmp_path, tiny_gguf):
    path, _ = tiny_gguf["llama"]
    data = open(path, "rb").read()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        load_model(str(bad))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        load_model(str(bad))


def test_unsupported_architecture(tmp_path):
    from mmt_mlx.testing import write_tiny_gguf

    path = tmp_path / "bert.gguf"
    write_tiny_gguf(str(path), "llama", architecture_name="bert")
    with pytest.raises(ModelFormatError, match="unsupported architecture 'bert'"):
        load_model(str(path))
