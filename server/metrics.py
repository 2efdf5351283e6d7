"""Server counters, rendered in the Prometheus text exposition format (``GET /metrics``)."""

from __future__ import annotations

import collections
import sys
import threading
from collections import defaultdict

from .engine import EngineGauges, GenerationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_WINDOW = 512  # time-to-first-token quantiles are over this many latest requests


def peak_rss_bytes() -> int:
    """The process's peak resident set (0 where the platform does not report it)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


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
        self.cached_prompt_tokens = 0
        self.ttft_count = 0
        self.ttft_sum = 0.0
        self.ttft_recent: collections.deque[float] = collections.deque(maxlen=TTFT_WINDOW)

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
            self.cached_prompt_tokens += stats.cached_tokens
            if stats.ttft is not None:
                self.ttft_count += 1
                self.ttft_sum += stats.ttft
                self.ttft_recent.append(stats.ttft)
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
            counters = [
                ("mmt_prompt_tokens_total", "Prompt tokens processed.", self.prompt_tokens),
                ("mmt_generation_tokens_total", "Tokens generated.", self.generation_tokens),
                ("mmt_generations_total", "Generations run by the worker.", self.generations),
                ("mmt_generations_cancelled_total", "Generations stopped by a client disconnect.", self.cancelled),
                ("mmt_prompt_tokens_cached_total", "Prompt tokens reused from the prompt cache (not recomputed).",
                 self.cached_prompt_tokens),
            ]  # fmt: skip
            for name, help_, value in counters:
                metric(name, "counter", help_, [("", value)])
            speeds = [
                ("mmt_prompt_tokens_per_second", "Prompt processing speed", self.last_prompt_tps,
                 self.avg_prompt_tps()),
                ("mmt_generation_tokens_per_second", "Decode speed", self.last_generation_tps,
                 self.avg_generation_tps()),
            ]  # fmt: skip
            for name, what, last, avg in speeds:
                metric(name, "gauge", f"{what} (last request, and token-weighted average over all requests).",
                       [('{stat="last"}', float(last)), ('{stat="avg"}', float(avg))])  # fmt: skip
            ttft = sorted(self.ttft_recent)
            metric("mmt_time_to_first_token_seconds", "summary", "Seconds from a request's submission to its "
                   f"first token (quantiles over the last {TTFT_WINDOW} requests).",
                   [(f'{{quantile="{q}"}}', float(ttft[min(len(ttft) - 1, int(q * len(ttft)))]))
                    for q in (0.5, 0.9, 0.99) if ttft]
                   + [("_sum", float(self.ttft_sum)), ("_count", self.ttft_count)])  # fmt: skip
        engine_gauges = [
            ("mmt_queue_depth", "Requests waiting for the generation worker.", gauges.queue_depth),
            ("mmt_queue_capacity", "Maximum number of waiting requests (more get 429).", gauges.max_queue),
            ("mmt_requests_running", "Requests being generated right now (the running batch).", gauges.running),
            ("mmt_batch_capacity", "Requests generated together at most.", gauges.max_batch),
            ("mmt_prompt_cache_bytes", "KV-cache bytes held by the prompt cache.", gauges.prompt_cache_bytes),
            ("mmt_prompt_cache_entries", "Finished requests held by the prompt cache.", gauges.prompt_cache_entries),
            ("mmt_process_peak_rss_bytes", "Peak resident memory of the server process.", peak_rss_bytes()),
        ]  # fmt: skip
        for name, help_, value in engine_gauges:
            metric(name, "gauge", help_, [("", value)])
        label = f'{{model="{_esc(model)}"}}' if model else ""
        metric("mmt_model_loaded", "gauge", "1 once the model is loaded and the server is ready.",
               [(label, int(loaded))])  # fmt: skip
        return "\n".join(lines) + "\n"
