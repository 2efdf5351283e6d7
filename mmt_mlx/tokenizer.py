"""Tokenizers built from GGUF metadata or a Hugging Face model directory, matching llama.cpp's token ids.

GGUF "gpt2" vocabularies become a `tokenizers` byte-level BPE, GGUF "llama" (SentencePiece) ones a
SentencePiece BPE model. Control tokens written literally in a text are encoded as their single id, as
llama.cpp does for prompts; decoding hides them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from mmt_mlx.errors import MmtError, ModelFormatError
from mmt_mlx.gguf_file import read_gguf_metadata

# GGUF and SentencePiece number token types the same way
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_HIDDEN = (UNKNOWN, CONTROL, UNUSED)
# token texts llama.cpp also treats as end of generation
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>")

# Fallback for models without a template whose vocabulary has Gemma's turn markers (Gemma 3 base GGUFs have
# none). No BOS is written: encode() adds it. System text heads the first user turn, as in Gemma 3.
GEMMA_FALLBACK_TEMPLATE = (
    "{% set ns = namespace(sys='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.sys = ns.sys + m['content'] + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['role'] == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
    "{{ m['content'] }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class StreamDetokenizer:
    """Incremental decoding: add() returns only whole characters, finalize() what is left.

    Each step decodes a short window of ids, from the last point where the text was complete, with the
    tokenizer's own decode, so the pieces always add up to decode(ids)."""

    def __init__(self, tok: Tokenizer) -> None:
        self._decode, self._ids = tok.decode, []
        self._prefix = self._read = 0  # the window is ids[prefix:]; ids[prefix:read] is already shown

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._step(final=False)

    def finalize(self) -> str:
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        prev = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        # an incomplete UTF-8 character decodes to U+FFFD: wait for the next token, but not forever (a
        # character has at most 4 bytes; invalid bytes or a run of hidden tokens must not grow the window)
        if (
            final
            or len(self._ids) - self._read > 8
            or (len(text) > len(prev) and not text.endswith("\ufffd"))
        ):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prev) :]
        return ""


class _Splitter:
    """Cuts the given token texts out of a text, leftmost and longest first (llama.cpp's partitioning)."""

    def __init__(self, table: dict[str, int]) -> None:
        # candidates are found by their first two characters, then looked up longest first: a regex
        # alternation of Gemma's ~6k control tokens would try every branch at every position
        self.table, self.lengths = table, {}
        for s in table:
            self.lengths.setdefault(s[0], set()).add(len(s))
        self.lengths = {c: sorted(ns, reverse=True) for c, ns in self.lengths.items()}
        heads = sorted({s[:2] for s in table}, key=len, reverse=True)
        self.first = re.compile("|".join(map(re.escape, heads))) if heads else None

    def split(self, text: str) -> list[str | int]:
        parts: list[str | int] = []
        start = pos = 0
        while self.first is not None and (m := self.first.search(text, pos)) is not None:
            pos = m.start()
            n = next((n for n in self.lengths[text[pos]] if text[pos : pos + n] in self.table), 0)
            if n:
                parts += [text[start:pos], self.table[text[pos : pos + n]]]
                start = pos = pos + n
            else:
                pos += 1
        return [*parts, text[start:]]


class Tokenizer:
    """Text <-> token ids, chat template and streaming detokenization of one model."""

    def __init__(
        self, *, encode_plain: Callable[[str], list[int]], vocab_size: int, bos_id: int | None,
        eos_ids: list[int | None], add_bos: bool, chat_template: str | None, special_tokens: dict[str, int],
        piece_bytes: list[bytes] | None = None, decode_fn: Callable[[list[int]], str] | None = None,
        strip_space_after_bos: bool = False, user_tokens: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        """eos_ids: the model's EOS first, then other end-of-generation ids (None is skipped). special_tokens:
        text -> id of control tokens, split out of texts when parsing specials; user_tokens: text -> id of
        user-defined tokens, always split out (as llama.cpp does). decode uses piece_bytes or decode_fn."""
        eos_ids = list(dict.fromkeys(int(i) for i in eos_ids if i is not None))
        self.bos_id, self.eos_ids, self.vocab_size, self.add_bos = bos_id, set(eos_ids), vocab_size, add_bos
        self.chat_template, self.special_tokens = chat_template, special_tokens
        names = {i: t for t, i in special_tokens.items()}  # for the template's bos_token / eos_token
        self.bos_token, self.eos_token = names.get(bos_id, ""), names.get(eos_ids[0], "") if eos_ids else ""
        self._encode_plain = encode_plain
        self.piece_bytes = piece_bytes  # bytes each id shows (hidden ones: b""), for grammar token masks
        self._strip_space = strip_space_after_bos  # drop the dummy-prefix space after BOS, as llama.cpp does
        self._decode_fn = decode_fn or (  # unknown ids show nothing
            lambda ids: b"".join(piece_bytes[i] for i in ids if 0 <= i < vocab_size).decode(
                "utf-8", "replace"
            )
        )
        user = user_tokens or {}
        self._splitters = {False: _Splitter(user), True: _Splitter({**special_tokens, **user})}

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of text; add_bos=None uses the model's default (GGUF tokenizer.ggml.add_bos_token), and
        BOS is not added again to a text starting with it. parse_special (llama.cpp's `special=True`, which it
        uses for prompts) encodes control tokens written in the text as their id."""
        ids: list[int] = []
        for part in self._splitters[parse_special].split(text):
            if isinstance(part, int):
                ids.append(part)
            elif part:
                ids += self._encode_plain(part)
        bos = self.bos_id if (self.add_bos if add_bos is None else add_bos) else None
        return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids for display: control tokens (BOS, EOS, turn markers) are hidden."""
        text = self._decode_fn(list(ids))
        return text[1:] if self._strip_space and ids[:1] == [self.bos_id] and text[:1] == " " else text

    def detokenizer(self) -> StreamDetokenizer:
        return StreamDetokenizer(self)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> str:
        """Render messages with the model's Jinja chat template, in a sandbox.

        A model without a template whose vocabulary has `<start_of_turn>` (Gemma 3 base GGUFs) gets
        GEMMA_FALLBACK_TEMPLATE: `<start_of_turn>user\\n...<end_of_turn>\\n` turns, then
        `<start_of_turn>model\\n`; system text heads the first user turn. Other models without a template
        raise MmtError. Content given as OpenAI-style parts is reduced to its text parts."""
        template = self.chat_template
        if template is None and "<start_of_turn>" in self.special_tokens:
            template = GEMMA_FALLBACK_TEMPLATE
        elif template is None:
            raise MmtError("the model has no chat template: send a plain prompt (completions) instead")
        msgs = [dict(m, content=_text_content(m.get("content"))) for m in messages]
        try:
            env = dict(add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, **kw)
            return _compile_template(template).render(messages=msgs, eos_token=self.eos_token, **env)
        except MmtError:
            raise
        except Exception as e:  # noqa: BLE001  # a template failure is a bad request, not a crash
            raise MmtError(f"chat template failed: {type(e).__name__}: {e}") from None


def _text_content(c: Any) -> Any:
    if isinstance(c, list):  # OpenAI-style content parts: keep the text
        c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    return "" if c is None else c


_TEMPLATES: dict[str, Any] = {}


def _compile_template(source: str) -> Any:
    if source not in _TEMPLATES:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise MmtError(f"chat template: {message}")

        # the settings and helpers of Hugging Face transformers, which these templates are written for
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


# --- GGUF ------------------------------------------------------------------------------------------------


def tokenizer_from_gguf(reader_or_path: Any) -> Tokenizer:
    """Tokenizer of a GGUF file: its path, a gguf.GGUFReader (whose mapped bytes are parsed again, faster than
    its fields) or an object whose `fields` dict holds plain values already (mmt_mlx.gguf_file.GGUFFile)."""
    src, fields = reader_or_path, getattr(reader_or_path, "fields", None)
    ready = isinstance(fields, dict) and not hasattr(src, "data")
    meta = fields if ready else read_gguf_metadata(getattr(src, "data", src))
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelFormatError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    n, types = len(tokens), meta.get("tokenizer.ggml.token_type", np.full(len(tokens), NORMAL))
    special, user = (
        {tokens[i]: i for i in np.flatnonzero(types == ty).tolist() if tokens[i]}
        for ty in (CONTROL, USER_DEFINED)
    )
    types = types.tolist()

    def tid(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(v) if v is not None and 0 <= int(v) < n else None

    eos = [tid("eos"), tid("eot"), tid("eom"), *(special.get(t) for t in _EOG_TEXTS)]
    if kind not in ("gpt2", "llama"):
        raise ModelFormatError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    dummy = kind == "llama" and bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if kind == "gpt2":
        hf = _gguf_bpe(meta, tokens)
        encode_plain = lambda text: hf.encode(text, add_special_tokens=False).ids
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(_spm_model_proto(meta, tokens, types, dummy))
        encode_plain = sp.encode
    return Tokenizer(
        encode_plain=encode_plain, vocab_size=n, bos_id=tid("bos"), eos_ids=eos,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        chat_template=meta.get("tokenizer.chat_template"), special_tokens=special,
        piece_bytes=_piece_bytes(tokens, types, kind == "gpt2"), strip_space_after_bos=dummy,
        user_tokens=user,
    )  # fmt: skip


def _gguf_bpe(meta: dict[str, Any], tokens: list[str]) -> Any:
    """A `tokenizers` byte-level BPE of the vocabulary and merges, without special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp splits every digit (\p{N}) off before the GPT-2 regex
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre not in ("default", "gpt2"):
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} approximated by GPT-2's: ids may differ from llama.cpp", stacklevel=2
        )
    hf.pre_tokenizer = byte_level
    return hf


def _piece_bytes(tokens: list[str], types: list[int], byte_level: bool) -> list[bytes]:
    """The bytes each token shows (llama.cpp's token_to_piece); hidden tokens show nothing."""
    if not byte_level:  # SentencePiece: U+2581 is a space, <0xNN> a raw byte
        return [
            b"" if ty in _HIDDEN else bytes([int(t[3:5], 16)]) if ty == BYTE
            else t.replace("\u2581", " ").encode() for t, ty in zip(tokens, types)
        ]  # fmt: skip
    # GPT-2 stores each byte as a printable character: invert that map
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    dec = {chr(c): b for b, c in zip(bs, bs)}
    dec.update({chr(256 + k): b for k, b in enumerate(b for b in range(256) if b not in bs)})
    return [
        b"" if ty in _HIDDEN else bytes(dec[c] for c in t) if ty != USER_DEFINED and all(c in dec for c in t)
        else t.encode()  # user-defined tokens are plain text, as in llama.cpp
        for t, ty in zip(tokens, types)
    ]  # fmt: skip


def _varint(n: int) -> bytes:
    n, out = n & (1 << 64) - 1, bytearray()  # negative int32 fields are 10-byte varints
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _pb(field: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(field << 3 | 2) + _varint(len(value)) + value
    return _varint(field << 3) + _varint(value)


def _spm_model_proto(meta: dict[str, Any], tokens: list[str], types: list[int], dummy: bool) -> bytes:
    """A serialized SentencePiece BPE ModelProto, written by hand: 262k protobuf objects would take ~1.2 s."""
    n, unk = len(tokens), int(meta.get("tokenizer.ggml.unknown_token_id", 0))
    scores = np.asarray(meta.get("tokenizer.ggml.scores", np.zeros(n)), dtype="<f4").tobytes()
    pieces, types = [t.encode() for t in tokens], [CONTROL if t == UNKNOWN else t for t in types]
    types[unk] = UNKNOWN  # SentencePiece wants exactly one unknown piece
    # User-defined pieces are cut out of the raw text beforehand, as llama.cpp does: those holding literal
    # spaces stay unreachable for SentencePiece (it sees U+2581), as they are for llama.cpp's merges.
    seen: set[bytes] = set()
    for i, p in enumerate(pieces):  # SentencePiece refuses duplicate or empty pieces: keep the id, unused
        if p in seen or not p:
            pieces[i], types[i] = f"<mmt_unused_{i}>".encode(), UNUSED
        seen.add(pieces[i])
    v = [_varint(k) for k in range(max(map(len, pieces)) + 16)]  # every length that occurs
    # SentencePiece message: piece=1 (bytes), score=2 (float), type=3 (enum); ModelProto.pieces=1
    inner = [b"\n%b%b\x15%b\x18%b" % (v[len(p)], p, scores[4 * i : 4 * i + 4], v[t]) for i, (p, t) in
             enumerate(zip(pieces, types))]  # fmt: skip
    # TrainerSpec: model_type=3 (BPE=2), vocab_size=4, byte_fallback=35, unk/bos/eos/pad ids=40..43
    trainer = _pb(3, 2) + _pb(4, n) + _pb(35, 1) + _pb(40, unk) + _pb(41, -1) + _pb(42, -1) + _pb(43, -1)
    # NormalizerSpec: identity; a dummy prefix (space) on each text fragment as llama.cpp's add_space_prefix
    # does; keep extra whitespace; escape spaces as U+2581
    normalizer = _pb(1, b"identity") + _pb(3, int(dummy)) + _pb(4, 0) + _pb(5, 1)
    return b"".join([b"\n%b%b" % (v[len(x)], x) for x in inner]) + _pb(2, trainer) + _pb(3, normalizer)


# --- Hugging Face directories ----------------------------------------------------------------------------


def tokenizer_from_hf_dir(path: str | os.PathLike) -> Tokenizer:
    """Tokenizer of a Hugging Face model directory: tokenizer.json (preferred) or tokenizer.model; BOS, EOS,
    add_bos_token and chat_template from tokenizer_config.json (also chat_template.jinja, and EOS ids from
    generation_config.json)."""
    root = Path(path)
    cfg, gen = _read_json(root / "tokenizer_config.json"), _read_json(root / "generation_config.json")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (root / "chat_template.jinja").exists():
        template = (root / "chat_template.jinja").read_text()
    bos_t, eos_t = (
        t.get("content") if isinstance(t := cfg.get(f"{k}_token"), dict) else t for k in ("bos", "eos")
    )
    if (root / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(str(root / "tokenizer.json"))
        special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        hf.encode_special_tokens = True  # Tokenizer.encode splits special tokens out itself
        to_id: Callable[[str], int | None] = hf.token_to_id
        encode_plain = lambda text: hf.encode(text, add_special_tokens=False).ids
        decode_fn = lambda ids: hf.decode(ids, skip_special_tokens=True)
        vocab_size = hf.get_vocab_size(with_added_tokens=True)
        piece_bytes = _hf_piece_bytes(hf, vocab_size, set(special.values()))
        bos = to_id(bos_t) if bos_t else None
        # without add_bos_token in the config, do what the post-processor does
        default_bos = bos is not None and hf.encode("", add_special_tokens=True).ids[:1] == [bos]
    elif (root / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
        vocab_size, default_bos = sp.get_piece_size(), True
        special = {sp.id_to_piece(i): i for i in range(vocab_size) if sp.is_control(i)}
        sp_types = [
            BYTE if sp.is_byte(i) else CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i)
            else UNUSED if sp.is_unused(i) else NORMAL for i in range(vocab_size)
        ]  # fmt: skip
        piece_bytes = _piece_bytes([sp.id_to_piece(i) for i in range(vocab_size)], sp_types, False)
        to_id = lambda t: i if (i := sp.piece_to_id(t)) >= 0 and sp.id_to_piece(i) == t else None
        encode_plain = sp.encode
        decode_fn = lambda ids: sp.decode([i for i in ids if 0 <= i < vocab_size])
        bos_t = bos_t or (sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
        eos_t = eos_t or (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
        bos = to_id(bos_t) if bos_t else None
    else:
        raise ModelFormatError(f"{root}: no tokenizer.json or tokenizer.model")
    gen_eos = gen.get("eos_token_id")
    eos = [to_id(eos_t) if eos_t else None, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
    eos += [special.get(t) for t in _EOG_TEXTS]
    return Tokenizer(
        encode_plain=encode_plain, vocab_size=vocab_size, bos_id=bos, eos_ids=eos,
        add_bos=bool(cfg.get("add_bos_token", default_bos)), chat_template=template, special_tokens=special,
        decode_fn=decode_fn, piece_bytes=piece_bytes,
    )  # fmt: skip


def _hf_piece_bytes(hf: Any, vocab_size: int, special_ids: set[int]) -> list[bytes]:
    """Bytes of each id of a `tokenizers` tokenizer: GPT-2 byte-level pieces, else SentencePiece-style pieces
    (U+2581 for a space, <0xNN> for a byte)."""
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    tokens = [hf.id_to_token(i) or "" for i in range(vocab_size)]
    byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    types = [
        CONTROL if i in special_ids else BYTE if byte_piece.fullmatch(t) else NORMAL
        for i, t in enumerate(tokens)
    ]
    return _piece_bytes(tokens, types, "ByteLevel" in kinds)


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{p}: invalid JSON ({e})") from None
