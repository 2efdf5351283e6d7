"""Load test of the OpenAI-compatible server: continuous batching and the prompt cache.

Starts the server (a subprocess on 127.0.0.1) and, in one run:

1. serves each of 8 requests alone, one after another (the reference outputs; greedy and seeded sampling);
2. concurrency sweep: 1, 2, 4 and 8 concurrent streams (EOS banned so every stream runs its full length):
   aggregate decode tokens/s while all streams decode, end-to-end throughput, time-to-first-token
   percentiles; every response of the 8-stream round must equal the same request served alone;
3. prompt cache: a two-turn chat (turn 2 resends turn 1) on this server and on a second server started with
   the prompt cache off: turn-2 time to first token, and the answers must be identical;
4. single-request decode tokens/s through the server vs direct ``stream_generate`` (within 10%).

Goals (issue 14): aggregate decode at 8 streams >= 3x the 1-stream figure; turn-2 prompt processing >= 5x
faster with the prompt cache.

    python bench/server_load.py --json bench/results/server-load-smollm2-135m-instruct.json
    python bench/server_load.py --dense            # the dense (dequantized) model
    python bench/server_load.py --tiny --max-tokens 16   # tiny random model (fast, for a smoke run)
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


def _loader(tiny: bool, model: str | None, dense: bool = False):
    if tiny:
        from mmt_mlx.testing import tiny_model

        return tiny_model
    from mmt_mlx.loader import load_model

    return lambda: load_model(model, dense=dense)


def run_server(args: argparse.Namespace) -> None:
    """The --serve mode: what the subprocess runs."""
    import uvicorn
    from mmt_mlx.server.app import create_app

    app = create_app(_loader(args.tiny, args.model, args.dense), max_queue=64, max_batch=args.max_batch,
                     prompt_cache_bytes=int(args.prompt_cache_mb * 1024 * 1024))  # fmt: skip
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    args: argparse.Namespace, port: int, prompt_cache_mb: float | None = None
) -> subprocess.Popen:
    mb = args.prompt_cache_mb if prompt_cache_mb is None else prompt_cache_mb
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--serve",
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--prompt-cache-mb",
        str(mb),
    ]
    cmd += (["--tiny"] if args.tiny else []) + (["--model", args.model] if args.model else [])
    cmd += ["--dense"] if args.dense else []  # fmt: skip
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

    lm = _loader(args.tiny, args.model, args.dense)()
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


def decode_window_tps(results: list[Result]) -> float:
    """Aggregate tokens/s while every stream decodes: SSE events between the last first token and the first
    last token, over that window's length (prefill and the tail where streams have left excluded)."""
    start = max(r.first_token_at for r in results)
    end = min(r.last_token_at for r in results)
    if end <= start:
        return float("nan")
    n = sum(1 for r in results for t in r.events if start < t <= end)
    return n / (end - start)


async def concurrent(url: str, bodies: list[dict[str, Any]]) -> tuple[list[Result], float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_request(client, b) for b in bodies))
        return list(results), time.perf_counter() - t0


def sweep_bodies(model_name: str, n: int, max_tokens: int, ban: dict[str, float]) -> list[dict[str, Any]]:
    """n distinct requests: even ones greedy, odd ones seeded sampling; EOS banned (full-length streams).
    No top-p: its sort of the vocabulary per token would weigh on small models' steps more than the batch."""
    out = []
    for i in range(n):
        body = {"model": model_name, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "logit_bias": ban, "temperature": 0.0}  # fmt: skip
        if i % 2:
            body.update(temperature=0.8, seed=100 + i)
        out.append(body)
    return out


def concurrency_sweep(args: argparse.Namespace, url: str, model_name: str, ban: dict[str, float]) -> dict:
    alone = asyncio.run(serial(url, sweep_bodies(model_name, 8, args.max_tokens, ban)))
    rounds: dict[str, Any] = {}
    for n in args.streams:
        results, wall = asyncio.run(concurrent(url, sweep_bodies(model_name, n, args.max_tokens, ban)))
        ttft = [r.ttft for r in results]
        rounds[str(n)] = {
            "decode_tok_s": decode_window_tps(results),
            "throughput_tok_s": sum(r.tokens for r in results) / wall,
            "wall_s": wall,
            "ttft_s": {f"p{q}": pct(ttft, q) for q in (50, 90, 99)},
            "mismatches": sum(a.text != b.text for a, b in zip(alone, results)),
        }
        r = rounds[str(n)]
        print(f"{n} streams: decode {r['decode_tok_s']:.2f} tok/s aggregate, end-to-end {r['throughput_tok_s']:.2f}"
              f" tok/s, ttft p50/p90/p99 " + "/".join(f"{v:.2f}" for v in r["ttft_s"].values())
              + f" s, {n - r['mismatches']}/{n} equal to alone", flush=True)  # fmt: skip
    base = rounds[str(args.streams[0])]["decode_tok_s"]
    for r in rounds.values():
        r["speedup_vs_1"] = r["decode_tok_s"] / base
    return rounds


def chat_turns(
    url: str, model_name: str, max_tokens: int, ban: dict[str, float], repeat: int
) -> dict[str, Any]:
    """Turn 1, then turn 2 resending turn 1 (greedy): each turn's time to first token and answer."""
    system = "You are a careful assistant. " + " ".join(PROMPTS) * repeat  # a long shared context
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": PROMPTS[0]}]
    body = {"model": model_name, "max_tokens": max_tokens, "temperature": 0.0, "logit_bias": ban}
    r1 = asyncio.run(serial(url, [dict(body, messages=msgs)]))[0]
    msgs = msgs + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": PROMPTS[1]}]
    r2 = asyncio.run(serial(url, [dict(body, messages=msgs)]))[0]
    reused = read_metric(url, "mmt_prompt_tokens_cached_total")
    return {"turn1_ttft_s": r1.ttft, "turn2_ttft_s": r2.ttft, "turn2_text": r2.text, "tokens_reused": reused}


def prompt_cache_phase(args: argparse.Namespace, url: str, model_name: str, ban: dict[str, float]) -> dict:
    """The chat on a second server with the prompt cache on, and on the main one (prompt cache off)."""
    repeat = 1 if args.tiny else args.chat_context
    port = free_port()
    proc = start_server(args, port, prompt_cache_mb=args.prompt_cache_mb)
    try:
        warm = chat_turns(f"http://127.0.0.1:{port}", model_name, args.chat_tokens, ban, repeat)
    finally:
        stop_server(proc)
    cold = chat_turns(url, model_name, args.chat_tokens, ban, repeat)
    out = {"with_cache": warm, "without_cache": cold, "identical": warm["turn2_text"] == cold["turn2_text"],
           "turn2_ttft_speedup": cold["turn2_ttft_s"] / warm["turn2_ttft_s"]}  # fmt: skip
    print(f"turn 2 time to first token: {warm['turn2_ttft_s']:.2f} s with the prompt cache "
          f"({warm['tokens_reused']:.0f} tokens reused), {cold['turn2_ttft_s']:.2f} s without: "
          f"{out['turn2_ttft_speedup']:.1f}x; answers identical: {out['identical']}", flush=True)  # fmt: skip
    return out


def read_metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model argument (default: the default model)")
    ap.add_argument("--dense", action="store_true", help="the dense (dequantized) model instead of FGS codes")
    ap.add_argument("--tiny", action="store_true", help="use mmt_mlx.testing.tiny_model()")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrency levels")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--prompt-cache-mb", type=float, default=512)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per stream in the sweep")
    ap.add_argument("--chat-tokens", type=int, default=16, help="tokens per chat turn (prompt-cache phase)")
    ap.add_argument(
        "--chat-context",
        type=int,
        default=12,
        help="copies of the prompt list in the chat's system message (12: ~850 tokens)",
    )
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens for the direct decode comparison")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-direct", action="store_true", help="skip the server-vs-direct decode comparison")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args)
        return

    port = free_port()
    proc = start_server(args, port, prompt_cache_mb=0)  # the sweep measures batching alone
    url = f"http://127.0.0.1:{port}"
    try:
        model_name = httpx.get(url + "/health").json()["model"]
        lm = _loader(args.tiny, args.model, args.dense)()  # for the tokenizer's EOS ids
        ban = {str(e): -100.0 for e in lm.tokenizer.eos_ids}
        del lm
        print(
            f"model {model_name}{' (dense)' if args.dense else ''}, load average {os.getloadavg()}",
            flush=True,
        )
        asyncio.run(serial(url, sweep_bodies(model_name, 1, 4, ban)))  # warm-up
        summary: dict[str, Any] = {
            "model": model_name, "dense": args.dense, "max_tokens": args.max_tokens,
            "load_average_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }  # fmt: skip
        summary["streams"] = concurrency_sweep(args, url, model_name, ban)
        summary["prompt_cache"] = prompt_cache_phase(args, url, model_name, ban)
        if not args.skip_direct:
            summary["decode_tok_s"] = decode_comparison(args, url, model_name)
        summary["load_average_end"] = os.getloadavg()
        summary["server_peak_rss_bytes"] = read_metric(url, "mmt_process_peak_rss_bytes")
        print(f"server peak memory: {summary['server_peak_rss_bytes'] / 2**20:.0f} MiB")
        top = summary["streams"][str(args.streams[-1])]
        print(f"aggregate decode at {args.streams[-1]} streams: {top['speedup_vs_1']:.2f}x one stream (goal 3x); "
              f"turn-2 prompt cache speedup {summary['prompt_cache']['turn2_ttft_speedup']:.1f}x (goal 5x)")  # fmt: skip
        ok = (
            all(r["mismatches"] == 0 for r in summary["streams"].values())
            and summary["prompt_cache"]["identical"]
        )
        print("outputs identical to the same requests served alone / cold:", "PASS" if ok else "FAIL")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        if not ok:
            sys.exit(1)
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
