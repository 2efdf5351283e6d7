"""Token generation: prefill, KV-cached decode, sampling, stop strings, streaming text and timings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from mmt_mlx.request import GenerationRequest, make_request
from mmt_mlx.sample import Sampler, SamplingParams

if TYPE_CHECKING:
    from mmt_mlx.build import LoadedModel

PREFILL_CHUNK = 512  # bounds the attention scores and activations of long prompts


@dataclass
class GenerationChunk:
    text: str  # new text; "" while a stop string or a UTF-8 character is still pending
    token: int | None
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None until the last chunk: "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float


def prefill(model, prompt: list[int], cache: list) -> mx.array:
    """Run the prompt through the model in chunks; return the last position's logits (vocab,) as f32."""
    for start in range(0, len(prompt) - 1, PREFILL_CHUNK):
        part = prompt[start : min(start + PREFILL_CHUNK, len(prompt) - 1)]
        model(mx.array(part)[None], cache)
        mx.eval([c.state for c in cache])
    logits = model(mx.array(prompt[-1:])[None], cache)
    return logits[0, -1].astype(mx.float32)


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, new: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was hit)."""
        self.text += new
        if not self.stops:
            out, self.emitted = self.text[self.emitted :], len(self.text)
            return out, False
        search_from = max(0, self.emitted - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted : end] if end > self.emitted else ""
            self.emitted = max(self.emitted, end)
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        safe = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : safe], safe
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


def stream_generate(
    lm: LoadedModel,
    prompt: list[int],
    *,
    max_tokens: int,
    sampling: SamplingParams | None = None,
    stop: list[str] | None = None,
    logprobs: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[GenerationChunk]:
    """Generate up to max_tokens after prompt, yielding one chunk per token (the last has finish_reason).

    Raises the typed errors of :func:`mmt_mlx.request.make_request` for a prompt the model cannot take."""
    request = make_request(lm, prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, logprobs=logprobs)
    return generate_request(lm, request, should_stop)


def generate_request(
    lm: LoadedModel, request: GenerationRequest, should_stop: Callable[[], bool] | None = None
) -> Iterator[GenerationChunk]:
    """Run a request validated by :func:`mmt_mlx.request.make_request`; ``should_stop`` is polled per token."""
    prompt, max_tokens, logprobs = request.prompt, request.max_tokens, request.logprobs
    sampler = Sampler(request.sampling)
    model, tok = lm.model, lm.tokenizer
    cache = model.make_cache()
    detok, matcher = tok.detokenizer(), StopMatcher(list(request.stop))
    generated: list[int] = []
    t0 = time.perf_counter()
    logits = prefill(model, prompt, cache)
    prompt_time = 0.0
    t_decode = t0

    def chunk(text: str, token, lp, top, reason) -> GenerationChunk:
        n = len(generated)
        decode_time = time.perf_counter() - t_decode
        return GenerationChunk(
            text, token, lp, top, reason, len(prompt), n,
            len(prompt) / prompt_time if prompt_time else 0.0,
            (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
        )  # fmt: skip

    if max_tokens == 0:
        yield chunk("", None, None, None, "length")
        return
    while True:
        processed = sampler.process(logits, prompt + generated, generated)
        token_arr = sampler.sample(processed)
        lp = top = None
        if logprobs:
            logp = logits - mx.logsumexp(logits)
            mx.eval(token_arr, logp)
            tid = int(token_arr.item())
            lp = float(logp[tid].item())
            if logprobs > 1 or logprobs == 1:
                best = mx.argsort(-logp)[:logprobs]
                top = [(int(i), float(v)) for i, v in zip(best.tolist(), logp[best].tolist())]
        else:
            tid = int(token_arr.item())
        if not generated:
            prompt_time = time.perf_counter() - t0
            t_decode = time.perf_counter()
        if tid in tok.eos_ids:
            generated.append(tid)
            yield chunk(matcher.feed(detok.finalize())[0] + matcher.flush(), tid, lp, top, "stop")
            return
        generated.append(tid)
        text, hit = matcher.feed(detok.add(tid))
        if hit:
            yield chunk(text, tid, lp, top, "stop")
            return
        cancelled = should_stop is not None and should_stop()
        if len(generated) >= max_tokens or cancelled:
            rest, hit = matcher.feed(detok.finalize())
            text += rest + ("" if hit else matcher.flush())
            yield chunk(text, tid, lp, top, "stop" if hit or cancelled else "length")
            return
        yield chunk(text, tid, lp, top, None)
        logits = model(mx.array([[tid]]), cache)[0, -1].astype(mx.float32)


def generate(lm: LoadedModel, prompt: str, max_tokens: int = 128, **kwargs) -> str:
    """Convenience: the whole completion of a text prompt as one string."""
    ids = lm.tokenizer.encode(prompt)
    return "".join(c.text for c in stream_generate(lm, ids, max_tokens=max_tokens, **kwargs))
