"""The runtime's request: what one generation needs, validated once against the model it runs on.

Every front end (the CLI through ``stream_generate``, the HTTP server through ``make_request``) builds a
:class:`GenerationRequest` here, so the prompt, the token budget and the token ids are checked in one place
and the errors are typed (:mod:`mmt_mlx.errors`): callers map them by class, never by message text.
Per-request decoding state that a later feature adds (a token-mask constraint for structured output, a
prompt-cache key) belongs in this dataclass as one more field, read by the generator or the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmt_mlx.errors import ContextLengthError, EmptyPromptError, MmtError, TokenIdError
from mmt_mlx.sample import SamplingParams

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel


@dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request: build it with :func:`make_request`, not directly."""

    prompt: list[int]  # token ids, non-empty, shorter than the model's context
    max_tokens: int  # new tokens at most, already clamped to the context left (0 is allowed)
    sampling: SamplingParams = field(default_factory=SamplingParams)  # seed and logit bias included
    stop: tuple[str, ...] = ()  # stop strings (non-empty), matched on the decoded text
    logprobs: int = 0  # 0: none; k >= 1: the sampled token's logprob and the k most likely alternatives


def vocab_size(lm: LoadedModel) -> int | None:
    """The number of token ids the model accepts (the tokenizer's, else the model's config), if known."""
    for obj in (lm.tokenizer, getattr(lm.model, "args", None)):
        v = getattr(obj, "vocab_size", None) if obj is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def make_request(
    lm: LoadedModel,
    prompt: list[int],
    *,
    max_tokens: int | None = None,
    sampling: SamplingParams | None = None,
    stop: list[str] | tuple[str, ...] | None = None,
    logprobs: int = 0,
) -> GenerationRequest:
    """Check a request against ``lm`` and return it in the form the generator runs.

    ``max_tokens`` None means "until the context is full". Raises :class:`EmptyPromptError`,
    :class:`ContextLengthError`, :class:`TokenIdError` (prompt ids or logit-bias ids outside the vocabulary)
    or :class:`MmtError` (bad sampling parameters).
    """
    ids = [int(t) for t in prompt]
    if not ids:
        raise EmptyPromptError("the prompt is empty")
    context = int(lm.context_length)
    if len(ids) >= context:
        raise ContextLengthError(len(ids), context)
    sampling = sampling or SamplingParams()
    sampling.validate()
    vocab = vocab_size(lm)
    if vocab is not None:
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise TokenIdError("prompt", bad[0], vocab)
        bad = [t for t in sampling.logit_bias or {} if not 0 <= t < vocab]
        if bad:
            raise TokenIdError("logit_bias", bad[0], vocab)
    if logprobs < 0:
        raise MmtError("logprobs must be >= 0")
    left = context - len(ids)
    budget = left if max_tokens is None else max(0, min(int(max_tokens), left))
    return GenerationRequest(ids, budget, sampling, tuple(s for s in stop or () if s), logprobs)
