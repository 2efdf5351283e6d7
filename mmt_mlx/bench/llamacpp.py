"""Timing llama.cpp (llama-cpp-python, optional) on the source GGUF, the same way as the MLX variants."""

from __future__ import annotations

import time

from mmt_mlx.bench.timing import bench_tokens


class LlamaCppTimer:
    """``pp()``: one prompt pass of p tokens; ``tg()``: g tokens fed one at a time (llama-bench's tg), seconds."""

    def __init__(self, path: str, p: int, g: int, threads: int = 2) -> None:
        from llama_cpp import Llama

        self.p, self.g = p, g
        self.llm = Llama(model_path=str(path), n_ctx=p + g + 16, n_batch=max(p, 32), n_threads=threads,
                         n_threads_batch=threads, verbose=False)  # fmt: skip
        self.prompt = bench_tokens(self.llm.n_vocab(), max(p, g))

    def warm_up(self) -> None:
        self._pp(self.prompt[: min(self.p, 64)])
        self._tg(min(self.g, 8))

    def pp(self) -> float:
        return self._pp(self.prompt[: self.p])

    def tg(self) -> float:
        return self._tg(self.g)

    def close(self) -> None:
        if hasattr(self.llm, "close"):
            self.llm.close()

    def _pp(self, tokens: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        return time.perf_counter() - t0

    def _tg(self, n: int) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        for tok in self.prompt[:n]:
            self.llm.eval([tok])
        return time.perf_counter() - t0
