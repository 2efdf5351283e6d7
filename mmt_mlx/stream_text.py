"""What a generation streams: its chunks (text, token, logprobs, timings) and stop-string matching."""

from __future__ import annotations

from dataclasses import dataclass

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
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache (not recomputed)


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
