"""Server counters, rendered in the Prometheus text exposition format (``GET /metrics``)."""

from __future__ import annotations

import threading
from collections import defaultdict

from .engine import EngineGauges, GenerationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe counters: updated by the HTTP side (requests) and the generation worker (tokens)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.generations = 0
        self.cancelled = 0
        self.prompt_seconds = 0.0
        self.generation_seconds = 0.0
        self.last_prompt_tps = 0.0
        self.last_generation_tps = 0.0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def record_generation(self, stats: GenerationStats) -> None:
        """The engine's ``on_generation`` hook (called from its worker thread)."""
        prompt_tokens, generation_tokens = stats.prompt_tokens, stats.generation_tokens
        prompt_tps, generation_tps, cancelled = stats.prompt_tps, stats.generation_tps, stats.cancelled
        with self._lock:
            self.generations += 1
            self.cancelled += int(cancelled)
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            if prompt_tokens > 0 and prompt_tps > 0:
                self.prompt_seconds += prompt_tokens / prompt_tps
                self.last_prompt_tps = prompt_tps
            if generation_tokens > 0 and generation_tps > 0:
                self.generation_seconds += generation_tokens / generation_tps
                self.last_generation_tps = generation_tps

    def avg_prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    def avg_generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def render(self, gauges: EngineGauges, model: str | None = None, loaded: bool = False) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                v = f"{value:.6g}" if isinstance(value, float) else str(value)
                lines.append(f"{name}{labels} {v}")

        with self._lock:
            reqs = sorted(self.requests.items())
            metric("mmt_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [(f'{{endpoint="{_esc(e)}",status="{s}"}}', n) for (e, s), n in reqs])  # fmt: skip
            metric(
                "mmt_prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)]
            )
            metric("mmt_generation_tokens_total", "counter", "Tokens generated.",
                   [("", self.generation_tokens)])  # fmt: skip
            metric("mmt_generations_total", "counter", "Generations run by the worker.",
                   [("", self.generations)])  # fmt: skip
            metric("mmt_generations_cancelled_total", "counter", "Generations stopped by a client disconnect.",
                   [("", self.cancelled)])  # fmt: skip
            metric("mmt_prompt_tokens_per_second", "gauge", "Prompt processing speed (last request, and "
                   "token-weighted average over all requests).",
                   [('{stat="last"}', float(self.last_prompt_tps)),
                    ('{stat="avg"}', float(self.avg_prompt_tps()))])  # fmt: skip
            metric("mmt_generation_tokens_per_second", "gauge", "Decode speed (last request, and token-weighted "
                   "average over all requests).",
                   [('{stat="last"}', float(self.last_generation_tps)),
                    ('{stat="avg"}', float(self.avg_generation_tps()))])  # fmt: skip
        metric("mmt_queue_depth", "gauge", "Requests waiting for the generation worker.",
               [("", gauges.queue_depth)])  # fmt: skip
        metric("mmt_queue_capacity", "gauge", "Maximum number of waiting requests (more get 429).",
               [("", gauges.max_queue)])  # fmt: skip
        metric("mmt_requests_running", "gauge", "Requests being generated right now.", [("", gauges.running)])
        label = f'{{model="{_esc(model)}"}}' if model else ""
        metric("mmt_model_loaded", "gauge", "1 once the model is loaded and the server is ready.",
               [(label, int(loaded))])  # fmt: skip
        return "\n".join(lines) + "\n"
