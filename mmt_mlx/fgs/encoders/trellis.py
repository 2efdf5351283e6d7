"""Trellis-coded quantization (TCQ) of the rotq level: 4-state codes that fit Gaussian weights more closely than
the Lloyd-Max levels at the same bits.

A code of ``bits`` bits is c = (b << 1) | x. The state of a position is the x bits (low bits) of the two codes
before it in the sequence, s = (x[i-2] << 1) | x[i-1] (zeros before the start), and its value is
lut[(s << bits) | c]: from each state x picks one of two subsets of a doubled codebook and b a level in it
(Ungerboeck's 4-state trellis written as a shift register, so a value depends only on its own code and the two
before it and decodes in parallel). The encoder finds the whole sequence at once by Viterbi search. In the rotq
level a sequence is one column of the rotated weight, running down the rows: GPTQ rounds one column of every
row at a time, so the search fits its error feedback unchanged.

The lut is trained (Lloyd iterations on Viterbi paths, from the classic union of 2**(bits+1) Lloyd-Max levels
in four interleaved subsets) on Gaussian groups of 32 divided by their RMS, what the codes see after the rotation
and the group scale, and stored with every tensor. On such values its MSE is 1.2 dB below the Lloyd-Max levels'
at 2 bits, 1.5 at 3, 1.4 at 4, 1.3 at 5 and 6; inside GPTQ, against scalar codes with their scale search, the
output error of tests/test_trellis.py's synthetic layer falls by 1.2 dB at 2 bits and 1.0 at 4 in groups of 64,
0.6-1.1 dB in groups of 32 from 2 to 5 bits (SmolLM2's layers: bench/trellis_layer_errors.py). Pure numpy except the Viterbi of
long sequences, which takes the native kernel (kernels/cpu/trellis.cpp) when it is built.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from mmt_mlx import native
from mmt_mlx.fgs.encoders.lloyd_max import lloyd_max

STATES = 4
TRELLIS = 2  # RotQCode.trellis: the x bits of history a value depends on
TRAIN_GROUP = 32


def _init_lut(bits: int) -> np.ndarray:
    """Ungerboeck's 4-state set partition: subset j of the 2**(bits+1) Lloyd-Max levels is every 4th from j;
    state s with branch x takes subset (s & 1) + 2 (x ^ (s >> 1))."""
    union = lloyd_max(bits + 1).astype(np.float64)
    lut = np.empty((STATES, 1 << (bits - 1), 2))
    for s in range(STATES):
        for x in range(2):
            lut[s, :, x] = union[(s & 1) + 2 * (x ^ (s >> 1)) :: 4]
    return lut.reshape(-1).astype(np.float32)


def viterbi_reference(
    t: np.ndarray, lut: np.ndarray, bits: int, w: np.ndarray | None = None, state0: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, T) uint8 and their total weighted error (N,) for sequences ``t`` (N, T): numpy, vectorized
    over the N sequences (the oracle of the native search, and the codebook's training)."""
    t = np.asarray(t, np.float32)
    n, steps = t.shape
    lv = np.asarray(lut, np.float32).reshape(STATES, 1 << (bits - 1), 2)  # [state, b, x]
    d = np.full((n, STATES), np.inf, np.float32)
    d[np.arange(n), 0 if state0 is None else np.asarray(state0) & 3] = 0
    came = np.empty((steps, n, STATES), np.uint8)
    level = np.empty((steps, n, STATES), np.uint8)
    for i in range(steps):
        e = (t[:, i, None, None, None] - lv[None]) ** 2  # (n, state, b, x)
        b = np.argmin(e, axis=2)  # (n, state, x)
        e = np.take_along_axis(e, b[:, :, None], 2)[:, :, 0]
        if w is not None:
            e = e * np.asarray(w, np.float32)[:, i, None, None]
        c = (d[:, :, None] + e).reshape(n, 2, 2, 2)  # [n, hi, lo, x]: state (hi << 1) | lo -> (lo << 1) | x
        hi = np.argmin(c, axis=1)  # (n, lo, x)
        d = np.take_along_axis(c, hi[:, None], 1)[:, 0].reshape(n, STATES)
        came[i] = hi.reshape(n, STATES)
        lo = np.arange(STATES) >> 1
        prev = (hi.reshape(n, STATES) << 1) | lo
        level[i] = b[np.arange(n)[:, None], prev, np.arange(STATES) & 1]
    s = np.argmin(d, axis=1)
    codes = np.empty((n, steps), np.uint8)
    rows = np.arange(n)
    for i in range(steps - 1, -1, -1):
        codes[:, i] = (level[i][rows, s] << 1) | (s & 1)
        s = (came[i][rows, s] << 1) | (s >> 1)
    return codes, d.min(axis=1)


def tcq_quantize(t: np.ndarray, w: np.ndarray, lut: np.ndarray, bits: int, state0: int = 0) -> np.ndarray:
    """Codes (n,) uint8 of one sequence ``t`` (n,) with weights ``w`` (n,) from ``state0``: the native search
    where it is built, else the numpy reference (the same codes; slow on long sequences)."""
    t = np.ascontiguousarray(t, np.float32)
    w = np.ascontiguousarray(w, np.float32)
    out = native.tcq_quantize(t, w, lut, bits, state0)
    if out is not None:
        return out
    return viterbi_reference(t[None], lut, bits, w[None], np.array([state0]))[0][0]


def trellis_states(q: np.ndarray, prev: np.ndarray | None = None) -> np.ndarray:
    """State (rows, cols) of every code of q (rows, cols): the x bits of the two rows above (``prev``: the two
    rows before q's first, (2, cols); None at the top of the tensor)."""
    q = np.asarray(q)
    x = np.zeros((q.shape[0] + 2, q.shape[1]), np.uint16)
    if prev is not None:
        x[:2] = np.asarray(prev)[-2:] & 1
    x[2:] = q & 1
    return (x[:-2] << 1) | x[1:-1]


def _training_values(rng: np.random.Generator, sequences: int, length: int) -> np.ndarray:
    """What the codes see in the rotq level: Gaussian weights divided by their group's scale, about the RMS
    of a group of 32 (lighter tails than N(0, 1): fitted to them, the codes gain ~0.07 dB more at 4 bits)."""
    x = rng.standard_normal((sequences * length // TRAIN_GROUP, TRAIN_GROUP))
    x /= np.sqrt(np.mean(x * x, axis=1, keepdims=True))
    return x.reshape(sequences, length).astype(np.float32)


@cache
def tcq_codebook(bits: int, iters: int = 10, sequences: int = 1000, length: int = 256) -> np.ndarray:
    """The trained lut (4 << bits,) float32 for ``bits``-bit codes (deterministic: fixed seeds)."""
    lut = _init_lut(bits)
    rng = np.random.default_rng(bits)
    for _ in range(iters):
        t = _training_values(rng, sequences, length)
        codes, _ = viterbi_reference(t, lut, bits)
        idx = ((trellis_states(codes.T).T.astype(np.int64)) << bits) | codes
        cnt = np.bincount(idx.ravel(), minlength=lut.size)
        tot = np.bincount(idx.ravel(), weights=t.ravel().astype(np.float64), minlength=lut.size)
        lut = np.where(cnt > 0, tot / np.maximum(cnt, 1), lut).astype(np.float32)
    return lut


@cache
def tcq_distortion(bits: int) -> float:
    """MSE per weight of the trained codes on fresh samples of what they were trained on."""
    t = _training_values(np.random.default_rng(100 + bits), 400, 256)
    _, err = viterbi_reference(t, tcq_codebook(bits), bits)
    return float(err.sum() / t.size)
