"""Distillation of rotq group scales: tune the codes' continuous part against the dense model (opt-in).

GPTQ fixes every code index and each row's scales layer by layer, against that layer's own output error. What
the model's next-token distribution loses is only measured at the end. Here the code indices stay fixed and
each group scale gets a trainable gain, s = s0 (1 + a), a = 0 at the start. The gains are fitted by Adam to
minimise KL(dense || coded) of the next-token distributions on the calibration chunks, through the whole
network at once. This is the idea of mlx-lm's DWQ, applied to rotated Gaussian codes. The file format does
not change: the tuned scales are stored as the old ones were (f16, or log-scale codes under each row's tuned top).

The student decodes each weight once as unit codes, codebook[q] (trellis codes: at each code's state), in f32. It applies the scales per step and
rotates each layer's input like the runtime (``rotq_layer``). The teacher is the dense source model,
evaluated on the fly so no (tokens, vocab) table is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten

from mmt_mlx import native
from mmt_mlx.fgs.codes import LOG_SCALE_STEPS, RotQCode, TensorCode, row_bands
from mmt_mlx.fgs.encoders.gauss_codes import log_scale_codes, unit_values
from mmt_mlx.fgs.encoders.quant import unpack_bits
from mmt_mlx.fgs.runtime.rotq_layer import Rotation
from mmt_mlx.fgs.runtime.row_bands import band_order_inverse


class _StudentCode(nn.Module):
    """W = (codebook[q] * s) R with s = s0 (1 + gain), ``gain`` (rows, groups) trainable.

    With log-scale codes (``RotQCode.row_scale``) the forward pass uses s rounded onto its row's grid, t 2^(-k/64)
    with k = round(-64 log2(s / t)), and t = top (1 + row_gain) trainable too: the rounding is in the loop (its
    gradient passed straight through to the gains), so what is trained is what is stored; a row's common shift
    moves its f16 top exactly."""

    def __init__(self, code: RotQCode) -> None:
        super().__init__()
        q = unpack_bits(code.wq, code.bits, code.cols)
        self.unit = mx.array(unit_values(q, code.codebook, code.bits, code.trellis))  # (rows, cols)
        self.s0 = mx.array(code.group_scales())
        self.gain = mx.zeros(self.s0.shape, mx.float32)
        self.top = None if code.row_scale is None else mx.array(code.row_scale.astype(np.float32))[:, None]
        if self.top is not None:
            self.row_gain = mx.zeros((code.rows, 1), mx.float32)
        self.group = code.group_size
        self.rotation = Rotation(code.cols, code.seed)

    def scales(self) -> mx.array:
        s = self.s0 * (1.0 + self.gain)
        if self.top is None:
            return s
        t = self.top * (1.0 + self.row_gain)
        k = mx.stop_gradient(mx.clip(mx.round(-LOG_SCALE_STEPS * mx.log2(s / t)), 0, 255))
        return t * mx.power(2.0, -k / LOG_SCALE_STEPS) + (s - mx.stop_gradient(s))

    def rotated_weight(self, rows: mx.array | None = None) -> mx.array:
        unit = self.unit if rows is None else mx.take(self.unit, rows, axis=0)
        s = self.scales()
        s = s if rows is None else mx.take(s, rows, axis=0)
        n, c = unit.shape
        return (unit.reshape(n, -1, self.group) * s[:, :, None]).reshape(n, c)

    def rotate(self, x: mx.array) -> mx.array:
        # Rotation.forward without its shared memo (gradient graphs keep their own rotated copies)
        r = self.rotation
        f = mx.fft.rfft(x.astype(mx.float32) * r.signs, axis=-1)
        return mx.fft.irfft(f * r.phase, n=r.n, axis=-1)

    def tuned_scales(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The tuned scales as stored: (f16 scales, None), or (log-scale codes, their rows' f16 tops)."""
        s = self.s0 * (1.0 + self.gain)
        if self.top is None:
            return np.asarray(s.astype(mx.float16)), None
        top = np.asarray(self.top * (1.0 + self.row_gain))[:, 0].astype(np.float16)
        return log_scale_codes(np.asarray(s), top), top


class _RowOrder:
    """Where each band's rows go in the tensor (a plain object: not a parameter)."""

    def __init__(self, tc: TensorCode) -> None:
        self.inv = mx.array(band_order_inverse([lv.row_ids() for lv in tc.levels]))


class _StudentTensor(nn.Module):
    """A tensor's student: one ``_StudentCode``, or one per row band (``codes.row_bands``), whose rotated rows
    are put back in the tensor's row order (every band shares the tensor's rotation)."""

    def __init__(self, tc: TensorCode) -> None:
        super().__init__()
        self.bands = [_StudentCode(lv) for lv in tc.levels]
        self._order = _RowOrder(tc) if len(tc.levels) > 1 else None
        self.rotation = self.bands[0].rotation

    def rotated_weight(self, rows: mx.array | None = None) -> mx.array:
        if self._order is None:
            return self.bands[0].rotated_weight(rows)
        w = mx.take(mx.concatenate([b.rotated_weight() for b in self.bands]), self._order.inv, axis=0)
        return w if rows is None else mx.take(w, rows, axis=0)

    def rotate(self, x: mx.array) -> mx.array:
        return self.bands[0].rotate(x)


class _StudentLinear(nn.Module):
    def __init__(self, code: TensorCode, bias: mx.array | None) -> None:
        super().__init__()
        self.code = _StudentTensor(code)
        if bias is not None:
            self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = self.code.rotate(x) @ self.code.rotated_weight().T
        return y + self.bias if "bias" in self else y


class _StudentEmbedding(nn.Module):
    def __init__(self, code: TensorCode) -> None:
        super().__init__()
        self.code = _StudentTensor(code)

    def __call__(self, ids: mx.array) -> mx.array:
        flat = ids.reshape(-1).astype(mx.int32)
        rows = self.code.rotation.inverse(self.code.rotated_weight(flat))
        return rows.reshape(*ids.shape, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.code.rotate(x) @ self.code.rotated_weight().T


def _students(model: nn.Module, codes: dict[str, TensorCode]) -> dict[str, _StudentTensor]:
    """Swap every coded Linear/Embedding of ``model`` for a student; {weight name: its student code}."""
    mods = dict(model.named_modules())
    swaps, out = [], {}
    for name, tc in codes.items():
        path = name.removesuffix(".weight")
        if path not in mods or not all(isinstance(lv, RotQCode) for lv in tc.levels):
            continue
        if len(tc.levels) > 1 and row_bands(tc.levels, tc.shape[0]) is None:
            continue  # several whole-tensor levels: not a rotq code this tunes
        m = mods[path]
        if isinstance(m, nn.Embedding):
            s = _StudentEmbedding(tc)
        elif isinstance(m, nn.Linear):
            s = _StudentLinear(tc, m.bias if "bias" in m else None)
        else:
            continue
        swaps.append((path, s))
        out[name] = s.code
    model.update_modules(tree_unflatten(swaps))
    return out


def _log_softmax(logits: mx.array) -> mx.array:
    lg = logits.astype(mx.float32)
    return lg - mx.logsumexp(lg, axis=-1, keepdims=True)


def distill_scales(
    make_model: Callable[[], nn.Module],
    codes: dict[str, TensorCode],
    chunks: list[list[int]],
    steps: int,
    lr: float = 1e-4,
    seq: int = 256,
    progress: bool = True,
    decay: bool = True,
) -> dict:
    """Tune the group scales of ``codes`` (in place) for ``steps`` Adam steps; return what happened.

    ``make_model()`` returns a fresh dense source model (called twice: teacher and student). Each step is one
    window of ``seq`` tokens cut from the calibration chunks, visited in a fixed shuffled order (neighbouring
    windows come from the same book). With ``decay`` the learning rate follows a cosine from ``lr`` to 0.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    teacher, student = make_model(), make_model()
    teacher.freeze()
    tuned = _students(student, codes)
    student.freeze()
    for c in tuned.values():
        c.unfreeze(keys=["gain", "row_gain"])
    windows = [part[a : a + seq + 1] for part in chunks for a in range(0, len(part) - 1, seq)]
    windows = [w for w in windows if len(w) > 8]
    order = np.random.default_rng(0).permutation(len(windows))

    def loss_fn(m: nn.Module, x: mx.array, p_ref: mx.array, lp_ref: mx.array) -> mx.array:
        lp = _log_softmax(m(x, m.make_cache())[0])
        return mx.mean(mx.sum(p_ref * (lp_ref - lp), axis=-1))

    grad_fn = nn.value_and_grad(student, loss_fn)
    opt = optim.Adam(learning_rate=optim.cosine_decay(lr, steps) if decay else lr)
    targets: dict[int, tuple[mx.array, mx.array]] = {}

    def target(i: int) -> tuple[mx.array, mx.array]:
        """The teacher's (p, log p) of window i, kept for the few windows scored before and after."""
        if i in targets:
            return targets[i]
        x = mx.array(windows[i][:-1])[None]
        lp = _log_softmax(teacher(x, teacher.make_cache())[0])
        p = mx.exp(lp)
        mx.eval(lp, p)
        if i < n_score:
            targets[i] = (p, lp)
        return p, lp

    def score() -> float:  # mean KL on the first windows, before and after (same windows, no update)
        with native.suspended():
            return float(np.mean([float(loss_fn(student, mx.array(windows[i][:-1])[None], *target(i)))
                                  for i in range(n_score)]))  # fmt: skip

    n_score = min(4, len(windows))
    kl_before = score()
    bar = tqdm(range(steps), desc="distilling scales", unit="step", disable=not progress, leave=False)
    for i in bar:
        k = int(order[i % len(windows)])
        p_ref, lp_ref = target(k)
        with native.suspended():  # the native norm/RoPE/attention nodes have no vjp
            loss, grads = grad_fn(student, mx.array(windows[k][:-1])[None], p_ref, lp_ref)
        opt.update(student, grads)
        mx.eval(loss, student.trainable_parameters(), opt.state)
        bar.set_postfix(kl=f"{float(loss):.4f}")
    kl_after = score()
    for name, t in tuned.items():
        for lv, c in zip(codes[name].levels, t.bands):
            lv.scales, top = c.tuned_scales()
            if top is not None:
                lv.row_scale = top
    return {
        "steps": steps, "lr": lr, "lr_decay": "cosine" if decay else "none", "seq": seq,
        "windows": len(windows), "tokens": sum(len(w) - 1 for w in windows), "tensors": len(tuned),
        "scored_windows": n_score, "kl_before": kl_before, "kl_after": kl_after,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
