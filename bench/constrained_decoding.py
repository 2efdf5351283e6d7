"""Cost of constrained decoding per token, next to the forward pass, on a real model.

For each grammar, a greedy answer is generated step by step and three parts are timed per token: the model's
forward pass (decode of one token, evaluated), the grammar's mask (llguidance's mask computation, its
unpacking and the masked logits, evaluated; the argmax after it is not counted) and advancing the grammar with the sampled token. Also the
one-off cost of compiling the grammar (llguidance's tokenizer is built once per model and reported apart).

    python bench/constrained_decoding.py                       # the default model (SmolLM2-135M, FGS)
    python bench/constrained_decoding.py --model smollm2-135m-instruct --dense -n 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from mmt_mlx.constrain import GrammarConstraint, compile_grammar, ll_tokenizer
from mmt_mlx.generate import prefill
from mmt_mlx.loader import load_model
from mmt_mlx.tool_calls import parse_tools, tool_grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "format": "email"},
        "skills": {"type": "array", "items": {"enum": ["python", "rust", "sql", "go"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                    "required": ["city", "country"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "skills", "address"],
    "additionalProperties": False,
}  # fmt: skip
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}]  # fmt: skip


def run(lm, name: str, grammar, prompt: str, n: int) -> dict:
    tok, model = lm.tokenizer, lm.model
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    )
    constraint = GrammarConstraint(tok, grammar)
    cache = model.make_cache()
    logits = prefill(model, ids, cache)
    mx.eval(logits)
    forward, mask, advance, out = [], [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        masked = constraint(out, logits)
        mx.eval(masked)
        t1 = time.perf_counter()
        tid = int(mx.argmax(masked).item())  # sampling: not counted
        if tid in tok.eos_ids:
            break
        t_adv = time.perf_counter()
        constraint.advance(tid)
        out.append(tid)
        t2 = time.perf_counter()
        logits = model(mx.array([[tid]]), cache)[0, -1].astype(mx.float32)
        mx.eval(logits)
        t3 = time.perf_counter()
        mask.append(t1 - t0)
        advance.append(t2 - t_adv)
        forward.append(t3 - t2)
    ms = lambda xs: 1000 * statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {
        "grammar": name, "tokens": len(out), "text": tok.decode(out),
        "forward_ms": ms(forward), "mask_ms": ms(mask), "advance_ms": ms(advance),
        "mask_mean_ms": 1000 * statistics.fmean(mask) if mask else float("nan"),
        "llguidance_mean_ms": 1000 * constraint.mask_seconds / max(constraint.steps, 1),
        "mask_share": (sum(mask) + sum(advance)) / max(sum(forward), 1e-9),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the default model)")
    ap.add_argument("--dense", action="store_true", help="the dense model instead of FGS")
    ap.add_argument("-n", type=int, default=48, help="tokens per answer at most")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    lm = load_model(a.model, dense=a.dense)
    t0 = time.perf_counter()
    ll_tokenizer(lm.tokenizer)
    tok_s = time.perf_counter() - t0
    cases = []
    for name, make, prompt in [
        ("json_object", lambda: compile_grammar(lm.tokenizer, "json_object"), "Give me a JSON object."),
        ("json_schema person", lambda: compile_grammar(lm.tokenizer, "json_schema", PERSON),
         "Describe a software engineer as JSON."),
        ("tool call (required)", lambda: tool_grammar(lm.tokenizer, parse_tools(WEATHER), "required", True),
         "What is the weather in Paris?"),
    ]:  # fmt: skip
        t0 = time.perf_counter()
        grammar = make()
        compile_ms = 1000 * (time.perf_counter() - t0)
        cases.append(dict(run(lm, name, grammar, prompt, a.n), compile_ms=compile_ms))
    result = {"model": lm.name, "vocab": lm.tokenizer.vocab_size, "ll_tokenizer_s": tok_s, "cases": cases}
    if a.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{lm.name}: vocab {lm.tokenizer.vocab_size}, llguidance tokenizer built in {tok_s:.2f} s")
    print(f"{'grammar':<22} {'tokens':>6} {'compile ms':>10} {'forward ms':>10} {'mask ms':>8} "
          f"{'advance ms':>10} {'llguidance mean ms':>18} {'mask+advance / forward':>22}")  # fmt: skip
    for c in cases:
        print(f"{c['grammar']:<22} {c['tokens']:>6} {c['compile_ms']:>10.1f} {c['forward_ms']:>10.1f} "
              f"{c['mask_ms']:>8.3f} {c['advance_ms']:>10.3f} {c['llguidance_mean_ms']:>18.3f} "
              f"{100 * c['mask_share']:>21.2f}%")  # fmt: skip
    for c in cases:
        print(f"  {c['grammar']}: {c['text'][:100]!r}")


if __name__ == "__main__":
    main()
