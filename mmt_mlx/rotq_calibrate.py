"""Calibration for the rotated Gaussian codes: full input covariances and measured per-class sensitivity.

Covariances: the dense model reads the shipped calibration text (several public-domain books, chunks spread
over all of it); every linear layer's input accumulates X^T X. Layers fed the very same input array (q/k/v,
gate/up) share one covariance, hence one rotation seed and one GPTQ factor. The tied embedding gets the LM
head's input covariance.

Sensitivity: what a tensor's output error costs is measured, not assumed: every tensor of a bucket (a tensor
class in the first layer, the last layer or the layers between; the embedding) is replaced by a coarse code
at once, and the KL divergence of the model's next-token distribution from the dense model's is measured on
a calibration chunk. KL per unit of relative output error is the bucket's price, which the byte planner uses.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from importlib import resources

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from mmt_mlx.recorder import InputRecorder

CHUNK = 512
CALIBRATION_FILES = ("data/calibration_mix.txt", "data/calibration.txt")


def calibration_chunks(tokenizer, n_tokens: int, chunk: int = CHUNK) -> list[list[int]]:
    """``n_tokens`` // chunk chunks (BOS + chunk - 1 tokens) spread evenly over the shipped calibration texts."""
    text = "\n\n".join(
        resources.files("mmt_mlx").joinpath(f).read_text(encoding="utf-8") for f in CALIBRATION_FILES
    )
    ids = tokenizer.encode(text, add_bos=False)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else ids[0]
    n = max(1, min(n_tokens // chunk, len(ids) // (chunk - 1)))
    starts = np.linspace(0, len(ids) - (chunk - 1), n).astype(int)
    return [[bos] + ids[s : s + chunk - 1] for s in starts]


class _CovRecorder(InputRecorder):
    """Adds X^T X of a layer's inputs to a shared pool."""

    def __init__(self, inner: nn.Module, name: str, pool: dict) -> None:
        super().__init__(inner)
        self.name, self.pool = name, pool

    def _record(self, x: mx.array) -> None:
        last = self.pool["_last"]
        if last is not None and last[0] is x:  # same input array as the previous layer: share its covariance
            self.pool["key"][self.name] = last[1]
            return
        f = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        h = f.T @ f
        mx.eval(h)
        acc = self.pool["h"].get(self.name)
        self.pool["h"][self.name] = h if acc is None else acc + h
        self.pool["n"][self.name] = self.pool["n"].get(self.name, 0) + f.shape[0]
        self.pool["key"][self.name] = self.name
        self.pool["_last"] = (x, self.name)


def input_covariances(
    model: nn.Module,
    chunks: Iterable[list[int]],
    on_logits: Callable[[list[int], mx.array], None] | None = None,
) -> tuple[dict, dict]:
    """({weight name: covariance key}, {covariance key: mean X^T X float64}) over the calibration chunks;
    ``on_logits(chunk, logits)`` sees the model's output on each chunk."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    pool: dict = {"h": {}, "n": {}, "key": {}, "_last": None}
    recorders = {n: _CovRecorder(m, n, pool) for n, m in targets}
    model.update_modules(tree_unflatten(list(recorders.items())))
    try:
        for part in chunks:
            pool["_last"] = None
            logits = model(mx.array(part)[None], model.make_cache())
            pool["_last"] = None
            if on_logits is not None:
                on_logits(part, logits[0])
    finally:
        model.update_modules(tree_unflatten([(n, r.inner) for n, r in recorders.items()]))
    covs = {k: np.asarray(h, dtype=np.float64) / max(pool["n"][k], 1) for k, h in pool["h"].items()}
    keys = {f"{n}.weight": f"{k}.weight" for n, k in pool["key"].items()}
    return keys, {f"{k}.weight": v for k, v in covs.items()}


class TokenImportance:
    """How much each vocabulary row (embedding, LM head) matters: the mean of the dense model's next-token
    probability over the calibration positions (a head row's error costs KL in proportion to its token's
    probability) and the token's share of the text (an embedding row is read when its token occurs), averaged.
    Pass it as ``input_covariances``' ``on_logits``."""

    def __init__(self) -> None:
        self.p: np.ndarray | None = None
        self.count: np.ndarray | None = None
        self.n = 0

    def __call__(self, part: list[int], logits: mx.array) -> None:
        p = mx.sum(mx.softmax(logits.astype(mx.float32), axis=-1), axis=0)
        if self.p is None:
            self.p = np.zeros(logits.shape[-1], np.float64)
            self.count = np.zeros(logits.shape[-1], np.float64)
        self.p += np.asarray(p, np.float64)
        np.add.at(self.count, np.asarray(part, np.int64), 1.0)
        self.n += len(part)

    def weights(self) -> np.ndarray:
        """(vocab,) non-negative weights summing to 1."""
        if self.p is None:
            raise ValueError("no calibration logits were seen")
        return 0.5 * (self.p + self.count) / self.n


def seed_of(cov_key: str) -> int:
    """The rotation seed of one distinct layer input (stable across runs and machines)."""
    return zlib.crc32(cov_key.encode()) & 0x7FFFFFFF


def tensor_class(name: str) -> str:
    """'layers.3.self_attn.q_proj.weight' -> 'self_attn.q_proj'; 'embed_tokens.weight' -> 'embed_tokens'."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[i + 2 : -1])
    return ".".join(parts[:-1])


def layer_index(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def bucket_of(name: str, n_layers: int) -> str:
    """The sensitivity bucket: class plus first/middle/last layer."""
    li = layer_index(name)
    c = tensor_class(name)
    if li is None:
        return c
    pos = "first" if li == 0 else "last" if li == n_layers - 1 else "mid"
    return f"{c}@{pos}"


def _log_probs(model: nn.Module, part: list[int]) -> mx.array:
    lg = model(mx.array(part)[None], model.make_cache())[0].astype(mx.float32)
    lp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
    mx.eval(lp)
    return lp


def bucket_kl(
    model: nn.Module, dense: dict[str, np.ndarray], coarse: dict[str, np.ndarray], buckets: dict[str, list[str]],
    part: list[int],
) -> dict[str, float]:  # fmt: skip
    """KL(dense || model with one bucket's tensors replaced by their coarse decode), bucket by bucket."""
    ref = _log_probs(model, part)
    p = mx.exp(ref)
    out = {}
    for b, names in buckets.items():
        model.load_weights([(n, mx.array(coarse[n])) for n in names], strict=False)
        lp = _log_probs(model, part)
        kl = mx.mean(mx.sum(p * (ref - lp), axis=-1))
        out[b] = max(float(kl), 1e-12)
        model.load_weights([(n, mx.array(dense[n])) for n in names], strict=False)
    return out
