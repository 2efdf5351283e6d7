"""The ``mmt`` command: generate, eval, convert, serve, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mmt_mlx.bench.cli import add_bench_parser
from mmt_mlx.cli_args import MODEL_HELP, add_model_arg
from mmt_mlx.errors import MmtError
from mmt_mlx.evals.cli import add_eval_parsers
from mmt_mlx.info import add_info_parser


def _sampling_args(p: argparse.ArgumentParser) -> None:
    # greedy unless told otherwise (as mlx-lm): a small model's first answer should not be a dice roll
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")


def cmd_generate(a: argparse.Namespace) -> int:
    from mmt_mlx.generate import stream_generate
    from mmt_mlx.loader import load_model
    from mmt_mlx.sample import SamplingParams

    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    if not prompt.strip():
        raise MmtError("the prompt is empty")
    sampling = SamplingParams(
        temperature=a.temp, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        repetition_penalty=a.repeat_penalty, seed=a.seed,
    )  # fmt: skip
    sampling.validate()
    if a.max_tokens < 1:
        raise MmtError("--max-tokens must be at least 1")
    lm = load_model(a.model, dense=a.dense)
    tok = lm.tokenizer
    if a.chat:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=None)
    else:
        ids = tok.encode(prompt)
    grammar = _grammar_arg(a, tok)
    last = None
    for chunk in stream_generate(
        lm, ids, max_tokens=a.max_tokens, sampling=sampling, stop=a.stop or None, grammar=grammar
    ):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if last is not None:
        print(
            f"[{lm.name}] prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"finish: {last.finish_reason}",
            file=sys.stderr,
        )
    return 0


def _grammar_arg(a: argparse.Namespace, tok) -> object | None:
    """The grammar asked for by --json-schema FILE, --json, --regex or --lark FILE (at most one)."""
    from mmt_mlx.constrain import compile_grammar

    given = [x for x in (a.json_schema, a.json_mode or None, a.regex, a.lark) if x]
    if len(given) > 1:
        raise MmtError("give at most one of --json-schema, --json, --regex, --lark")
    if a.json_mode:
        return compile_grammar(tok, "json_object")
    if a.regex:
        return compile_grammar(tok, "regex", a.regex)
    for path, kind in ((a.json_schema, "json_schema"), (a.lark, "lark")):
        if path:
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise MmtError(f"cannot read {path}: {e.strerror or e}") from None
            if kind == "lark":
                return compile_grammar(tok, "lark", text)
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as e:
                raise MmtError(f"{path} is not valid JSON: {e}") from None
            if isinstance(schema, dict) and isinstance(schema.get("schema"), dict) and "name" in schema:
                schema = schema["schema"]  # OpenAI's {"name": ..., "schema": {...}} wrapper
            return compile_grammar(tok, "json_schema", schema)
    return None


def cmd_convert(a: argparse.Namespace) -> int:
    from mmt_mlx.build import load_fgs, model_from_source
    from mmt_mlx.convert import PRESETS, convert, format_report, heldout_perplexity
    from mmt_mlx.fgs.encoders.planner import KINDS
    from mmt_mlx.locate import load_source
    from mmt_mlx.rotq_convert import BPW_PRESETS

    if a.preset in BPW_PRESETS:
        a.bpw, a.preset_bpw = BPW_PRESETS[a.preset], a.preset
    if sum(x is not None for x in (a.tau, a.preset if a.bpw is None else None, a.bpw)) > 1:
        raise MmtError("give one of --tau, --preset, --bpw")
    if a.preset is not None and a.preset not in PRESETS and a.bpw is None:
        raise MmtError(f"unknown preset {a.preset!r}: choose one of {', '.join(PRESETS)}")
    allowed = frozenset(x.strip() for x in a.levels.split(",")) if a.levels else KINDS
    if not allowed <= KINDS or "quant" not in allowed:
        raise MmtError(
            f"--levels must name some of {', '.join(sorted(KINDS))}, including quant (the overflow level)"
        )
    if a.distill and a.bpw is None:
        raise MmtError("--distill tunes rotated Gaussian codes: give it with --bpw or a rot preset")
    if a.distill < 0:
        raise MmtError("--distill must be >= 0 (steps)")
    if a.codes is not None and a.bpw is None:
        raise MmtError("--codes chooses the rotated Gaussian codes: give it with --bpw or a rot preset")
    if a.vocab_rows is not None and a.bpw is None:
        raise MmtError(
            "--vocab-rows chooses how rotated Gaussian codes spend bits: give it with --bpw or a rot preset"
        )
    out = Path(a.output)
    if out.exists() and not a.force:
        raise MmtError(f"{out} already exists (use --force to replace an FGS model there)")
    name, src = load_source(a.source)
    if a.bpw is not None:
        from mmt_mlx.convert import convert_bpw

        report = convert_bpw(src, out, a.bpw, overwrite=a.force, progress=not a.json, source_name=name,
                             preset=getattr(a, "preset_bpw", None), distill_steps=a.distill,
                             trellis=(a.codes or "trellis") == "trellis",
                             row_bands=(a.vocab_rows or "bands") == "bands")  # fmt: skip
    else:
        report = convert(src, out, tau=a.tau, preset=a.preset, calibrate=not a.no_calibrate, allowed=allowed,
                         overwrite=a.force, progress=not a.json, source_name=name,
                         grid_search=True if a.grid_search else None)  # fmt: skip
    if not a.no_eval:  # a ratio is never reported without the perplexity measured at it
        report["heldout_ppl_source"] = heldout_perplexity(model_from_source(src, name))
        report["heldout_ppl"] = heldout_perplexity(load_fgs(out, out.name))
    if a.json:
        print(json.dumps(report))
        return 0
    print(format_report(report))
    print(f"wrote {out}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from mmt_mlx.server.app import serve

    if not 0 < a.port < 65536:
        raise MmtError("--port must be in 1..65535")
    if a.max_queue < 1:
        raise MmtError("--max-queue must be at least 1")
    if a.max_batch < 1:
        raise MmtError("--max-batch must be at least 1")
    if a.prompt_cache_mb < 0:
        raise MmtError("--prompt-cache-mb must be >= 0")
    serve(
        a.model,
        host=a.host,
        port=a.port,
        api_key=a.api_key or os.environ.get("MMT_API_KEY"),
        max_queue=a.max_queue,
        max_batch=a.max_batch,
        prompt_cache_bytes=int(a.prompt_cache_mb * 1024 * 1024),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmt", description="FGS-coded language models on MLX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (streams it)")
    add_model_arg(g, dense=True)
    _sampling_args(g)
    g.add_argument("--max-tokens", "-n", type=int, default=256)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--json-schema", metavar="FILE", help="constrain the output to this JSON Schema")
    g.add_argument(
        "--json", dest="json_mode", action="store_true", help="constrain the output to a JSON object"
    )
    g.add_argument("--regex", help="constrain the output to this regular expression")
    g.add_argument("--lark", metavar="FILE", help="constrain the output to this Lark grammar (llguidance)")
    g.add_argument("prompt", help="the prompt, or - to read it from standard input")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="measure quality")
    esub = e.add_subparsers(dest="eval_command", required=True)
    add_eval_parsers(esub)  # ppl, kl, frontier

    c = sub.add_parser("convert", help="encode a model as FGS codes (an FGS model directory)")
    c.add_argument("source", help=MODEL_HELP)
    c.add_argument("-o", "--output", required=True, help="output directory")
    c.add_argument("--tau", type=float, default=None, help="relative error target per tensor")
    c.add_argument(
        "--preset",
        default=None,
        help="near-lossless, high, default, small, smallest, tiny; rot4, rot3, rot2.5 (rotated Gaussian codes "
        "at 4.0, 3.25, 2.5 bits per weight)",
    )
    c.add_argument(
        "--bpw",
        type=float,
        default=None,
        help="bits per stored weight (every byte counted): rotated Gaussian codes, bits spent by sensitivity",
    )
    c.add_argument(
        "--levels", default=None, help="allowed levels, e.g. quant,gaussian,circulant,meta (default all)"
    )
    c.add_argument(
        "--no-calibrate", action="store_true", help="plain weight error instead of activation-weighted"
    )
    c.add_argument(
        "--grid-search",
        action="store_true",
        help="search each quant group's grid (the tiny preset always does)",
    )
    c.add_argument(
        "--distill",
        type=int,
        default=0,
        metavar="STEPS",
        help="with --bpw: tune the group scales against the dense model's next-token distribution for STEPS "
        "windows of 256 calibration tokens (slow on a CPU; default 0: off)",
    )
    c.add_argument(
        "--codes",
        choices=("trellis", "scalar"),
        default=None,
        help="with --bpw: trellis-coded (default) or scalar Lloyd-Max Gaussian codes",
    )
    c.add_argument(
        "--vocab-rows",
        choices=("bands", "whole"),
        default=None,
        help="with --bpw: embedding/LM-head rows in bands by how often the calibration text uses their tokens, "
        "frequent ones at more bits (default), or every row at one width (for text unlike the calibration text)",
    )
    c.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity check")
    c.add_argument("--force", action="store_true", help="replace an existing FGS model at the output")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_arg(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", default=None, help="require this Bearer key (or set MMT_API_KEY)")
    s.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond this get HTTP 429")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together (continuous batching)")
    s.add_argument(
        "--prompt-cache-mb",
        type=float,
        default=512,
        help="KV state of finished requests kept for reuse by prompts sharing a prefix (0: off)",
    )
    s.set_defaults(func=cmd_serve)

    add_bench_parser(sub)
    add_info_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MmtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # no traceback at a user; MMT_DEBUG=1 shows it
        if os.environ.get("MMT_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set MMT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
