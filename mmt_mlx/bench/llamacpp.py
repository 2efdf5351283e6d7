"""Timing llama.cpp (llama-cpp-python, optional) on the source GGUF, the same way as the MLX variants."""

from __future__ import annotations

import time

from mmt_mlx.bench.timing import bench_tokens


def time_llamacpp(path: str, p: int, g: int, reps: int, threads: int = 2) -> tuple[list[float], list[float]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=p + g + 16, n_batch=max(p, 32), n_threads=threads,
                n_threads_batch=threads, verbose=False)  # fmt: skip
    prompt = bench_tokens(llm.n_vocab(), max(p, g))

    def pp(tokens: list[int]) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        return time.perf_counter() - t0

    def tg(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        for tok in prompt[:n]:
            llm.eval([tok])
        return time.perf_counter() - t0

    pp(prompt[: min(p, 64)])
    tg(min(g, 8))
    pp_t = [pp(prompt[:p]) for _ in range(reps)]
    tg_t = [tg(g) for _ in range(reps)]
    if hasattr(llm, "close"):
        llm.close()
    return pp_t, tg_t
