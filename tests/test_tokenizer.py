"""Tokenizer tests: ids equal llama.cpp's (fixtures made by tests/fixtures/make_tokenizer_fixtures.py), round
trips, streaming detokenization, chat templates, GGUFReader / Hugging Face directory inputs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mmt_mlx.errors import MmtError
from mmt_mlx.tokenizer import (
    Tokenizer,
    _gguf_bpe,
    _spm_model_proto,
    read_gguf_metadata,
    tokenizer_from_gguf,
    tokenizer_from_hf_dir,
)

FIXTURES = Path(__file__).parent / "fixtures"
BUILD_SECONDS: dict[str, float] = {}


def _smollm2_path() -> str:
    from mmt_mlx.registry import builtin_path

    return str(builtin_path("smollm2-135m-instruct"))


def _gemma3_path() -> str:
    from mmt_mlx.registry import builtin_path

    return str(builtin_path("gemma3-270m"))


PATHS = {"smollm2": _smollm2_path, "gemma3": _gemma3_path}


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request: pytest.FixtureRequest) -> tuple[str, Tokenizer, dict]:
    name = request.param
    path = PATHS[name]()
    t0 = time.perf_counter()
    tok = tokenizer_from_gguf(path)
    BUILD_SECONDS[name] = time.perf_counter() - t0
    fixture = json.loads((FIXTURES / f"tokenizer_{name}.json").read_text(encoding="utf-8"))
    return name, tok, fixture


def _texts(fixture: dict) -> list[str]:
    return list(dict.fromkeys(c["text"] for c in fixture["cases"]))


def test_encode_matches_llama_cpp(model: tuple[str, Tokenizer, dict]) -> None:
    name, tok, fixture = model
    for case in fixture["cases"]:
        add_bos = None if case["add_special"] else False  # llama.cpp's add_special follows add_bos_token
        ids = tok.encode(case["text"], add_bos=add_bos, parse_special=case["parse_special"])
        if ids != case["ids"]:
            i = next(
                (k for k, (a, b) in enumerate(zip(ids, case["ids"])) if a != b),
                min(len(ids), len(case["ids"])),
            )
            pytest.fail(
                f"{name}/{case['name']}: first difference at {i}: {ids[i : i + 8]} != {case['ids'][i : i + 8]}"
            )
    assert len(fixture["cases"][0]["ids"]) > 4000  # the Alice excerpt is really there


def test_build_time(model: tuple[str, Tokenizer, dict]) -> None:
    name = model[0]
    print(f"{name}: tokenizer built in {BUILD_SECONDS[name]:.2f} s")
    assert BUILD_SECONDS[name] < 10  # loose: ~0.3 s / ~0.7 s of CPU (SmolLM2 / Gemma), more on a busy machine


def test_model_properties(model: tuple[str, Tokenizer, dict]) -> None:
    name, tok, _ = model
    if name == "smollm2":
        assert (tok.vocab_size, tok.bos_id, tok.add_bos) == (49152, 1, False)
        assert tok.eos_ids == {2, 0}  # <|im_end|> (eos), <|endoftext|>
        assert tok.chat_template and "<|im_start|>" in tok.chat_template
    else:
        assert (tok.vocab_size, tok.bos_id, tok.add_bos) == (262144, 2, True)
        assert tok.eos_ids == {1, 106}  # <eos>, <end_of_turn>


def test_round_trip(model: tuple[str, Tokenizer, dict]) -> None:
    _, tok, fixture = model
    for text in _texts(fixture):
        if "\u2581" in text and model[0] == "gemma3":
            continue  # a literal U+2581 is SentencePiece's space mark: it decodes to a space (as in llama.cpp)
        assert tok.decode(tok.encode(text, parse_special=False)) == text
        assert tok.decode(tok.encode(text, add_bos=True, parse_special=False)) == text


def test_decode_hides_control_tokens(model: tuple[str, Tokenizer, dict]) -> None:
    name, tok, _ = model
    text = (
        "<start_of_turn>user\nHi<end_of_turn>\n" if name == "gemma3" else "<|im_start|>user\nHi<|im_end|>\n"
    )
    ids = tok.encode(text, add_bos=True)
    assert len(ids) < 10  # the markers are single ids
    assert tok.decode(ids) == "user\nHi\n"
    assert tok.decode([*ids, tok.vocab_size + 5]) == "user\nHi\n"  # ids out of the vocabulary show nothing


def test_streaming_equals_decode(model: tuple[str, Tokenizer, dict]) -> None:
    _, tok, fixture = model
    for text in [*_texts(fixture), "\U0001f9ec\U0001f984 \u4e2d\u6587 \ua66e"]:
        ids = tok.encode(text, add_bos=True)
        detok = tok.detokenizer()
        chunks = [detok.add(i) for i in ids]
        assert all("\ufffd" not in c for c in chunks)  # no character is ever split
        assert "".join(chunks) + detok.finalize() == tok.decode(ids)


def test_streaming_holds_back_partial_bytes(model: tuple[str, Tokenizer, dict]) -> None:
    _, tok, _ = model
    ids = tok.encode("\U0001fab0", add_bos=False)  # a rare emoji: byte tokens in both vocabularies
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["\U0001fab0"]
    assert detok.finalize() == ""
    detok = tok.detokenizer()
    assert detok.add(ids[0]) == ""
    assert detok.finalize() == "\ufffd"  # an unfinished character is shown as such at the end


def test_chat_template(model: tuple[str, Tokenizer, dict]) -> None:
    name, tok, _ = model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = tok.apply_chat_template(messages)
    if name == "smollm2":
        assert (
            prompt
            == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        )
        assert tok.encode(prompt)[:3] == [1, 9690, 198]  # <|im_start|> is one id
        no_gen = tok.apply_chat_template(messages[1:], add_generation_prompt=False)
        assert "You are a helpful AI assistant named SmolLM" in no_gen and not no_gen.endswith("assistant\n")
    else:  # no template in the GGUF: the Gemma fallback
        assert tok.chat_template is None
        assert prompt == "<start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\n"
        assert tok.encode(prompt)[:3] == [2, 105, 2364]  # BOS, <start_of_turn>, user
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(messages[1:])


def test_chat_template_errors() -> None:
    tok = Tokenizer(
        encode_plain=lambda t: [ord(c) for c in t], vocab_size=256, bos_id=None, eos_ids=[], add_bos=False,
        chat_template=None, special_tokens={}, piece_bytes=[bytes([i]) for i in range(256)],
    )  # fmt: skip
    with pytest.raises(MmtError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(MmtError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = "{{ messages.__class__.__mro__ }}"  # the sandbox refuses attribute escapes
    with pytest.raises(MmtError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert tok.encode("ab") == [97, 98] and tok.decode([97, 98]) == "ab"


def _tiny_spm_gguf(path: Path) -> None:
    import gguf

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *[f"<0x{b:02X}>" for b in range(256)], "\u2581", "a", "b"]
    tokens += ["\u2581a", "ab", "\u2581ab", "<ctl>", "  "]
    types = [3, 3, 3, 2, *[6] * 256, 1, 1, 1, 1, 1, 1, 3, 4]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 260 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0, 0.0])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_space_prefix(False)
    w.add_chat_template("{% for m in messages %}<ctl>{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_reader_input_and_metadata(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    _tiny_spm_gguf(path)
    reader = gguf.GGUFReader(str(path))
    meta = read_gguf_metadata(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = meta[key]
        assert (got.tolist() if isinstance(got, np.ndarray) else got) == pytest.approx(expected), key
    parsed = SimpleNamespace(fields=meta, tensors=[])  # like mmt_mlx.gguf_file.GGUFFile
    for src in (reader, path, str(path), parsed):
        tok = tokenizer_from_gguf(src)
        # the ids llama.cpp gives for this file (checked with llama-cpp-python 0.3.36); x is a byte fallback
        assert tok.encode("ab ab<ctl>x  a") == [2, 264, 265, 266, 124, 267, 261]
        assert tok.encode("ab ab<ctl>x  a", parse_special=False) == [
            2,
            264,
            265,
            64,
            103,
            120,
            112,
            66,
            124,
            267,
            261,
        ]
        assert tok.decode(tok.encode("ab ab<ctl>x  a")) == "ab abx  a"
        assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "<ctl>a"
        assert tok.eos_ids == {1} and tok.bos_token == "<bos>" and tok.eos_token == "<eos>"


def test_corrupt_gguf(tmp_path: Path) -> None:
    from mmt_mlx.errors import ModelFormatError

    path = tmp_path / "tiny.gguf"
    _tiny_spm_gguf(path)
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFormatError):
        tokenizer_from_gguf(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"nope" + bytes(100))
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        tokenizer_from_gguf(tmp_path / "bad.gguf")


def test_model_proto_parses_with_protobuf(tmp_path: Path) -> None:
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    path = tmp_path / "tiny.gguf"
    _tiny_spm_gguf(path)
    meta = read_gguf_metadata(path)
    types = meta["tokenizer.ggml.token_type"].tolist()
    mp = pb.ModelProto.FromString(_spm_model_proto(meta, meta["tokenizer.ggml.tokens"], types, False))
    assert [p.piece for p in mp.pieces][-3:] == ["\u2581ab", "<ctl>", "  "]
    assert [p.type for p in mp.pieces][:5] == [3, 3, 3, 2, 6] and mp.pieces[261].score == -2.0
    assert mp.trainer_spec.model_type == pb.TrainerSpec.BPE and mp.trainer_spec.byte_fallback
    assert (mp.trainer_spec.unk_id, mp.trainer_spec.bos_id, mp.trainer_spec.vocab_size) == (3, -1, 268)
    assert mp.normalizer_spec.name == "identity" and not mp.normalizer_spec.add_dummy_prefix


def test_hf_dir_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import AddedToken, decoders

    path = _smollm2_path()
    meta = read_gguf_metadata(path)
    hf = _gguf_bpe(meta, meta["tokenizer.ggml.tokens"])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t in meta["tokenizer.ggml.tokens"][:17]])
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": meta["tokenizer.chat_template"],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizer_from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, {2, 0}, False, 49152)
    fixture = json.loads((FIXTURES / "tokenizer_smollm2.json").read_text(encoding="utf-8"))
    for case in fixture["cases"]:
        assert tok.encode(case["text"], parse_special=case["parse_special"]) == case["ids"], case["name"]
        ids = case["ids"]
        detok = tok.detokenizer()
        assert "".join(detok.add(i) for i in ids) + detok.finalize() == tok.decode(ids)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n")


def test_hf_dir_sentencepiece_model(tmp_path: Path) -> None:
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    meta = read_gguf_metadata(_gemma3_path())
    types = meta["tokenizer.ggml.token_type"].tolist()
    mp = pb.ModelProto.FromString(_spm_model_proto(meta, meta["tokenizer.ggml.tokens"], types, False))
    for p in mp.pieces:  # Gemma's own tokenizer.model spells its whitespace pieces with U+2581
        if p.type == p.USER_DEFINED:
            p.piece = p.piece.replace(" ", "\u2581")
    (tmp_path / "tokenizer.model").write_bytes(mp.SerializeToString())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
    tok = tokenizer_from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (2, {1, 106}, True)
    fixture = json.loads((FIXTURES / "tokenizer_gemma3.json").read_text(encoding="utf-8"))
    for case in fixture["cases"]:
        add_bos = None if case["add_special"] else False
        ids = tok.encode(case["text"], add_bos=add_bos, parse_special=case["parse_special"])
        if (
            "\u2581" not in case["text"]
        ):  # SentencePiece itself reads a literal U+2581 as a space; llama.cpp not
            assert ids == case["ids"], case["name"]
        detok = tok.detokenizer()
        assert "".join(detok.add(i) for i in ids) + detok.finalize() == tok.decode(ids)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]).startswith("<start_of_turn>user\nHi")


def test_hf_dir_without_tokenizer(tmp_path: Path) -> None:
    from mmt_mlx.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="no tokenizer"):
        tokenizer_from_hf_dir(tmp_path)
