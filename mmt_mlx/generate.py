"""Token generation for one request: ``stream_generate`` (the CLI's and the tests' entry point).

It runs the request as the only stream of a :class:`~mmt_mlx.batch_generate.BatchGenerator`, the same code the
server batches requests with, so a request gives the same tokens alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import mlx.core as mx

from mmt_mlx.batch_generate import BatchGenerator
from mmt_mlx.request import GenerationRequest, make_request
from mmt_mlx.sample import SamplingParams
from mmt_mlx.stream_text import PREFILL_CHUNK, GenerationChunk, StopMatcher

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel
    from mmt_mlx.constrain import Grammar

__all__ = ["PREFILL_CHUNK", "GenerationChunk", "StopMatcher", "generate", "prefill", "stream_generate"]


def prefill(model, prompt: list[int], cache: list) -> mx.array:
    """Run the prompt through the model in chunks; return the last position's logits (vocab,) as f32."""
    for start in range(0, len(prompt) - 1, PREFILL_CHUNK):
        part = prompt[start : min(start + PREFILL_CHUNK, len(prompt) - 1)]
        model(mx.array(part)[None], cache)
        mx.eval([c.state for c in cache])
    logits = model(mx.array(prompt[-1:])[None], cache)
    return logits[0, -1].astype(mx.float32)


def stream_generate(
    lm: LoadedModel,
    prompt: list[int],
    *,
    max_tokens: int,
    sampling: SamplingParams | None = None,
    stop: list[str] | None = None,
    logprobs: int = 0,
    should_stop: Callable[[], bool] | None = None,
    grammar: Grammar | None = None,
) -> Iterator[GenerationChunk]:
    """Generate up to max_tokens after prompt, yielding one chunk per token (the last has finish_reason).

    Raises the typed errors of :func:`mmt_mlx.request.make_request` for a prompt the model cannot take."""
    request = make_request(
        lm, prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, logprobs=logprobs, grammar=grammar
    )
    return generate_request(lm, request, should_stop)


def generate_request(
    lm: LoadedModel, request: GenerationRequest, should_stop: Callable[[], bool] | None = None
) -> Iterator[GenerationChunk]:
    """Run a request validated by :func:`mmt_mlx.request.make_request`; ``should_stop`` is polled per token."""
    gen = BatchGenerator(lm, max_batch=1)
    gen.add(request, should_stop)
    while len(gen):
        for event in gen.step():
            if event.error is not None:
                raise event.error
            assert event.chunk is not None
            yield event.chunk


def generate(lm: LoadedModel, prompt: str, max_tokens: int = 128, **kwargs) -> str:
    """Convenience: the whole completion of a text prompt as one string."""
    ids = lm.tokenizer.encode(prompt)
    return "".join(c.text for c in stream_generate(lm, ids, max_tokens=max_tokens, **kwargs))
