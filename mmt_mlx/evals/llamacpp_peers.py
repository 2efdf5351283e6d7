"""llama.cpp's own quantization of the same source file, scored by llama.cpp: the peers in ``mmt eval frontier``.

llama-cpp-python (optional, ``pip install 'mmt_mlx[llamacpp]'``) binds ``llama_model_quantize``; a quantized
source (Q4_1, Q4_K_M) needs ``allow_requantize``. k- and i-quants need rows that are multiples of 256, so on
576- or 640-wide rows llama.cpp falls back to other types: each point is counted at the tensor bytes its file
really holds, not at the type's nominal bits. Scoring feeds llama.cpp the very token ids and chunks of
``mmt eval ppl`` (the tokenizers match llama.cpp's token for token), so the rule is the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mmt_mlx.bench.accounting import gguf_weight_bytes
from mmt_mlx.errors import MmtError
from mmt_mlx.perplexity import PerplexityResult, chunk_tokens

# llama.cpp's file types (llama.h, LLAMA_FTYPE_MOSTLY_*); the i-quants below 3 bits need an importance matrix
LLAMA_FTYPES = {
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "IQ3_S": 26, "IQ3_M": 27,
    "IQ4_NL": 25, "IQ4_XS": 30,
}  # fmt: skip
DEFAULT_LLAMA_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ3_S", "Q4_K_S", "IQ4_XS", "Q4_K_M", "Q5_K_M")


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def parse_llama_types(spec: str) -> list[str]:
    """``"Q3_K_M,q4_k_m"`` -> ["Q3_K_M", "Q4_K_M"]; unknown names are an error that lists the known ones."""
    types = [t.strip().upper() for t in spec.split(",") if t.strip()]
    bad = [t for t in types if t not in LLAMA_FTYPES]
    if bad:
        raise MmtError(f"unknown llama.cpp type {bad[0]!r}: choose among {', '.join(LLAMA_FTYPES)}")
    return types


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null (C code writes there directly, past Python's sys.stderr)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def requantize(src_gguf: str | Path, out: str | Path, qtype: str, threads: int = 2) -> None:
    """llama.cpp's ``llama_model_quantize`` of ``src_gguf`` to ``qtype`` (no importance matrix)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[qtype]
    params.allow_requantize = True
    params.nthread = threads
    with _quiet_stderr():  # llama.cpp prints a line per tensor that falls back to another type
        rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not Path(out).is_file():
        raise MmtError(f"llama.cpp could not quantize {src_gguf} to {qtype} (code {rc})")


def chunk_nll(logits: np.ndarray, targets: list[int]) -> float:
    """Summed negative log-likelihood of ``targets`` under rows of ``logits`` (float64 log-softmax)."""
    lg = np.asarray(logits, np.float64)
    m = lg.max(axis=-1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1))
    return float((logz - lg[np.arange(len(targets)), targets]).sum())


def llamacpp_perplexity(path: str | Path, ids: list[int], bos: int, ctx: int = 512, chunks: int = 8,
                        threads: int = 2) -> PerplexityResult:  # fmt: skip
    """Perplexity by llama.cpp of the GGUF at ``path``, same chunks and scored tokens as ``perplexity``."""
    from llama_cpp import Llama

    parts = chunk_tokens(ids, bos, ctx, chunks)
    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)  # fmt: skip
    total, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        for part in parts:
            llm.reset()
            llm.eval(part[:-1])
            total += chunk_nll(llm.scores[: len(part) - 1], part[1:])
            count += len(part) - 1
    finally:
        if hasattr(llm, "close"):
            llm.close()
    dt = time.perf_counter() - t0
    mean = total / count
    return PerplexityResult(math.exp(mean), count, len(parts), ctx, mean, dt, count / dt if dt else 0.0)


def llamacpp_points(src_gguf: str | Path, types: list[str], ids: list[int], bos: int, params: int,
                    ctx: int = 512, chunks: int = 8, progress=None) -> list[dict]:  # fmt: skip
    """One frontier point per llama.cpp type: requantized into a temporary file, scored, deleted."""
    points = []
    with tempfile.TemporaryDirectory(prefix="mmt-llamacpp-") as tmp:
        for qtype in types:
            out = Path(tmp) / f"{qtype}.gguf"
            t0 = time.perf_counter()
            requantize(src_gguf, out, qtype)
            stored = gguf_weight_bytes(out)["stored_bytes"]  # the tensor bytes, as for the source
            r = llamacpp_perplexity(out, ids, bos, ctx, chunks)
            out.unlink()
            points.append({"label": f"llama.cpp {qtype}", "kind": "llama.cpp", "qtype": qtype,
                           "stored_bytes": stored, "bits_per_weight": 8 * stored / params, "ppl": r.ppl,
                           "tokens": r.tokens, "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            if progress:
                progress(points[-1])
    return points
