"""Constrained decoding: a grammar (JSON Schema, JSON mode, regex, Lark) turned into a token mask per step.

The grammar engine is llguidance (the one llama.cpp uses). This module bridges our tokenizers to it
(`ll_tokenizer`), compiles what a user asks for into a checked grammar (`compile_grammar`, raising
:class:`GrammarError` naming the problem) and holds the per-request state (`GrammarConstraint`): a logits
processor ``constraint(tokens, logits) -> logits`` that masks every token the grammar forbids, advanced with
``constraint.advance(token)`` once a token is sampled. It knows nothing of the engine that calls it, so one
generation loop or a batched one can use it alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx
import numpy as np

from mmt_mlx.errors import MmtError

if TYPE_CHECKING:
    import llguidance

    from mmt_mlx.tokenizer import Tokenizer

GrammarKind = Literal["json_object", "json_schema", "regex", "lark"]

# Compact JSON: no free whitespace, so a small model cannot pad an answer with newlines forever.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(MmtError):
    """A schema, regex or grammar that is invalid or that the grammar engine cannot compile."""

    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(f"invalid {kind.replace('_', ' ')}: {problem.strip()}")
        self.kind = kind
        self.problem = problem.strip()


@dataclass(frozen=True)
class Grammar:
    """A compiled, checked grammar (llguidance's serialized form) and what it came from."""

    kind: GrammarKind
    source: str  # llguidance grammar text, ready for LLMatcher


def ll_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of ``tok``: each id's bytes, special ids by name, the model's EOS ids.

    Built once per tokenizer (~0.2 s for a 49k vocabulary) and cached."""
    import llguidance

    cached = getattr(tok, "_llguidance", None)
    if cached is not None:
        return cached
    pieces = tok.piece_bytes
    if pieces is None:
        raise MmtError("this model's tokenizer gives no token bytes: constrained decoding is unavailable")
    names = {i: t.encode() for t, i in tok.special_tokens.items() if 0 <= i < tok.vocab_size}
    table, special = [], []
    for i, b in enumerate(pieces):
        if i in names or not b:  # control tokens (and hidden ones) are never text to the grammar
            table.append(names.get(i, b"<mmt_hidden_%d>" % i))
            special.append(i)
        else:
            table.append(b)
    eos = sorted(tok.eos_ids)
    if not eos:
        raise MmtError("this model has no end-of-sequence token: constrained decoding is unavailable")

    class _Wrapped:  # what llguidance.TokenizerWrapper reads
        eos_token_id = eos[0]
        bos_token_id = tok.bos_id
        tokens = table
        special_token_ids = special

        def __call__(self, text: bytes | str) -> list[int]:
            s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
            return tok.encode(s, add_bos=False, parse_special=False)

    # every end-of-generation id is allowed wherever the grammar may end
    ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped()), eos_token=eos)
    tok._llguidance = ll  # type: ignore[attr-defined]  # one per tokenizer, built on first use
    return ll


def _check_json_schema(schema: Any) -> None:
    """The schema must be a JSON object (or true) that is itself valid JSON Schema."""
    if schema is True:
        return
    if not isinstance(schema, dict):
        raise GrammarError("json_schema", f"a JSON Schema must be an object, got {type(schema).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise GrammarError("json_schema", f"{e.message}" + (f" (at {where})" if where else "")) from None


def json_schema_grammar(schema: Any, lenient: bool = False) -> str:
    """llguidance grammar text of a JSON Schema (not yet checked: see :func:`compile_grammar`)."""
    import llguidance

    _check_json_schema(schema)
    options = dict(JSON_OPTIONS, lenient=lenient)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema if schema is not True else {}), overrides=options
        )
    except ValueError as e:
        raise GrammarError("json_schema", str(e)) from None


def compile_grammar(tok: Tokenizer, kind: GrammarKind, spec: Any = None, *, lenient: bool = False) -> Grammar:
    """Check and compile what a request asks for. ``spec``: the schema (json_schema), the pattern (regex)
    or the grammar text (lark); json_object ignores it. Raises GrammarError naming the problem.

    ``lenient`` (JSON Schema only): keywords llguidance does not implement are ignored instead of refused."""
    import llguidance

    if kind == "json_object":
        source = json_schema_grammar({"type": "object"})
    elif kind == "json_schema":
        source = json_schema_grammar(spec, lenient)
    elif kind in ("regex", "lark"):
        if not isinstance(spec, str) or not spec:
            raise GrammarError(kind, f"a {kind} must be a non-empty string")
        source = (
            llguidance.LLMatcher.grammar_from_regex(spec)
            if kind == "regex"
            else llguidance.LLMatcher.grammar_from_lark(spec)
        )
    else:
        raise GrammarError(str(kind), "unknown grammar kind (json_object, json_schema, regex, lark)")
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, ll_tokenizer(tok))
    if is_error:
        raise GrammarError(kind, messages[0] if messages else "the grammar does not compile")
    if messages and not lenient:  # warnings name what would be ignored (an unknown format, say): refuse it
        raise GrammarError(kind, "; ".join(messages))
    return Grammar(kind, source)


class GrammarConstraint:
    """Per-request grammar state: masks logits each step and follows the sampled tokens.

    ``constraint(tokens, logits)`` returns ``logits`` with every token the grammar forbids at -inf (EOS is
    allowed exactly where the grammar may end); ``advance(token)`` feeds the sampled token. ``mask_seconds``
    accumulates the time spent computing masks (the per-token cost of constrained decoding)."""

    def __init__(self, tok: Tokenizer, grammar: Grammar) -> None:
        import llguidance

        self.ll = ll_tokenizer(tok)
        self.matcher = llguidance.LLMatcher(self.ll, grammar.source, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(grammar.kind, self.matcher.get_error())
        self.vocab = tok.vocab_size
        self._bits = np.zeros((self.ll.vocab_size + 31) // 32, dtype=np.int32)
        self.mask_seconds = 0.0
        self.steps = 0

    def allowed(self) -> np.ndarray:
        """A (vocab,) bool array of the tokens the grammar allows next."""
        import time

        t0 = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise GrammarError("grammar", f"constrained decoding failed: {self.matcher.get_error()}")
        ok = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)
        self.mask_seconds += time.perf_counter() - t0
        self.steps += 1
        return ok

    def __call__(self, tokens: list[int], logits: mx.array) -> mx.array:
        ok = self.allowed()
        n = logits.shape[-1]
        if ok.shape[0] != n:  # model rows past the tokenizer's vocabulary are never text
            ok = np.concatenate([ok, np.zeros(max(0, n - ok.shape[0]), dtype=bool)])[:n]
        return mx.where(mx.array(ok), logits, -mx.inf)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise GrammarError("grammar", f"token {token} was not allowed: {self.matcher.get_error()}")

    @property
    def accepting(self) -> bool:
        """The text so far is a complete sentence of the grammar."""
        return self.matcher.is_accepting()
