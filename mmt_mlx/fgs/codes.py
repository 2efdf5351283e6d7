"""The FGS code containers: what each level stores for one 2-D tensor W of shape (rows, cols).

A tensor's code is an ordered list of levels; W is approximated by the sum of every level's decode.
Each level is a plain dataclass of numpy arrays plus a few ints, so it can be written to safetensors
(arrays) and a JSON manifest (everything else) without pickle. These containers know nothing of models.

Conventions shared by the codecs (fitting, reference decode) and the runtime (ops, kernels):

GaussianCode (L1, optional L2 meta-code on the amplitudes)
    Wp = W[:, perm] (columns reordered by ``perm``; identity when ``perm`` is None)
    Wp[i, j] = sum_k amp[i, k] * exp(-(j - mu[i, k])**2 / (2 * sigma_grid[sidx[i, k]]**2)),  j = 0..cols-1
    mu is an integer column position, the width is one of the ``sigma_grid`` values (a small fixed grid).
    Product: y = W @ x == Wp @ x[perm]; with integer centres and gridded widths it equals
    sum_k amp[i,k] * B[sidx[i,k], mu[i,k]] where B[s] = x[perm] blurred by the Gaussian of width grid[s].
    ``amp`` is either an (rows, K) array or a MetaCode that decodes to one (L2).

MetaCode (L2): an (rows, K) matrix compressed across rows.
    method "pca":  M = mean[None, :] + coef @ basis        arrays: mean (K,), coef (rows, r), basis (r, K)
    method "dct":  M = idct_II_ortho(C, axis=0) where C is zero except its first ``keep`` rows
                   arrays: coef (keep, K); params: rows
    method "haar": M = inverse orthonormal Haar transform (axis 0, rows padded to a power of two) of a
                   sparse coefficient set: arrays: index (n,) int32 flat indices into the (rows_p2, K)
                   coefficient grid, value (n,) float; params: rows

CirculantCode (FFT circular-convolution level)
    W padded with zeros to (Rb*b, Cb*b); tile (I, J) is circulant: T[m, n] = c_IJ[(m - n) mod b].
    Stored as spectra: spec = rfft(c_IJ) of shape (Rb, Cb, b//2 + 1), kept as spec_re / spec_im.
    Product: y_I = sum_J irfft(spec_IJ * rfft(x_J), n=b), then y cropped to rows.

QuantCode (overflow level, MLX affine layout so mx.quantized_matmul can run it)
    w[i, j] = scales[i, j // g] * q[i, j] + biases[i, j // g], q in [0, 2**bits - 1]
    wq is packed exactly as ``mx.quantize(w, group_size=g, bits=bits)`` packs it (uint32).

RotQCode (Gaussian codes in an FFT-rotated basis; ``encoders/gauss_codes.py``, ``encoders/rotation.py``)
    Wr[i, j] = codebook[q[i, j]] * scales[i, j // g], W = Wr R with R the seeded orthogonal FFT rotation
    R x = irfft(rfft(signs * x) * phase); product: y = Wr (R x). q packed as a little-endian bit stream.
    Group scales either f16 (``row_scale`` None), or log-scale codes: ``scales`` uint8 k and one f16
    ``row_scale`` r per row, scale = r * 2**(-k / LOG_SCALE_STEPS) in f32 (8 bits per group instead of 16).
    ``trellis`` 2 (trellis-coded, ``encoders/trellis.py``): codebook is a lut of 4 << bits values and a code's
    value is codebook[(s << bits) | q[i, j]] with s = ((q[i-2, j] & 1) << 1) | (q[i-1, j] & 1), the low bits of
    the two codes above it in its column (0 above row 0); trellis 0: codebook[q[i, j]].
    Row bands: with ``row_mask`` set the level codes only some of the tensor's ``tensor_rows`` rows (those whose
    bit is set, in ascending order; ``rows`` is their count) and is zero elsewhere. A tensor whose levels carry
    row masks is coded by bands: their masks partition its rows (``row_bands``), each band at its own width
    (``rotq_convert`` spends more bits on the embedding rows of frequent tokens). Trellis states run down a
    band's own rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class MetaCode:
    method: str  # "pca" | "dct" | "haar"
    rows: int
    cols: int  # K of the Gaussian level it belongs to
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class GaussianCode:
    rows: int
    cols: int
    sigma_grid: list[float]
    amp: np.ndarray | MetaCode  # (rows, K) float16/float32, or its L2 meta-code
    mu: np.ndarray  # (rows, K) integer column positions in [0, cols)
    sidx: np.ndarray  # (rows, K) uint8 index into sigma_grid
    perm: np.ndarray | None = None  # (cols,) int32 column order, or None for identity
    kind: str = "gaussian"


@dataclass
class CirculantCode:
    rows: int
    cols: int
    block: int
    spec_re: np.ndarray  # (Rb, Cb, block//2 + 1)
    spec_im: np.ndarray
    kind: str = "circulant"


@dataclass
class QuantCode:
    rows: int
    cols: int
    bits: int
    group_size: int
    wq: np.ndarray  # uint32, MLX packing
    scales: np.ndarray  # (rows, cols // group_size) float16
    biases: np.ndarray  # (rows, cols // group_size) float16
    kind: str = "quant"


@dataclass
class RotQCode:
    rows: int
    cols: int
    bits: int
    group_size: int
    seed: int
    codebook: np.ndarray  # (2**bits,) float32, sorted; with trellis 2 the (4 << bits,) lut
    wq: np.ndarray  # (rows, cols * bits / 32) uint32 packed code indices
    scales: np.ndarray  # (rows, cols // group_size) float16, or uint8 log-scale codes with row_scale
    row_scale: np.ndarray | None = None  # (rows,) float16: the top of each row's log-scale grid
    trellis: int = 0  # 0: scalar codes; 2: trellis-coded (a value depends on the codes of the two rows above)
    row_mask: np.ndarray | None = (
        None  # uint8 packed bits (little order): which of the tensor's rows it codes
    )
    tensor_rows: int = 0  # the tensor's rows, where row_mask is set
    kind: str = "rotq"

    def row_ids(self) -> np.ndarray | None:
        """The tensor rows this level codes (int32, ascending), or None when it codes all of them."""
        if self.row_mask is None:
            return None
        bits = np.unpackbits(np.asarray(self.row_mask, np.uint8), count=self.tensor_rows, bitorder="little")
        return np.flatnonzero(bits).astype(np.int32)

    def group_scales(self, rows: slice | None = None) -> np.ndarray:
        """The group scales (rows, cols // group_size) as float32, whichever way they are stored."""
        sl = rows if rows is not None else slice(0, self.rows)
        if self.row_scale is None:
            return np.asarray(self.scales[sl], np.float32)
        return log_scale_values(self.scales[sl], self.row_scale[sl])


LOG_SCALE_STEPS = 64  # log-scale codes per octave: 1.1% steps over the 4 octaves below the row's top


_LOG_SCALE_TABLE = np.exp2(-np.arange(256, dtype=np.float64) / LOG_SCALE_STEPS).astype(np.float32)


def log_scale_values(k: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """float32 r * 2**(-k / LOG_SCALE_STEPS) for uint8 codes k (rows, groups) and f16 r (rows,)."""
    return np.asarray(row_scale, np.float32)[:, None] * _LOG_SCALE_TABLE[np.asarray(k, np.uint8)]


Level = GaussianCode | CirculantCode | QuantCode | RotQCode


def row_mask(ids: np.ndarray, tensor_rows: int) -> np.ndarray:
    """The packed row mask (``RotQCode.row_mask``) of rows ``ids`` of a tensor with ``tensor_rows`` rows."""
    bits = np.zeros(tensor_rows, np.uint8)
    bits[np.asarray(ids)] = 1
    return np.packbits(bits, bitorder="little")


def level_shape(lv: Level) -> tuple[int, int]:
    """The shape a level's decode takes in the tensor: the whole tensor, also for a row band."""
    if getattr(lv, "row_mask", None) is not None:
        return (lv.tensor_rows, lv.cols)
    return (lv.rows, lv.cols)


def row_bands(levels: list[Level], rows: int) -> list[np.ndarray] | None:
    """Each level's rows where the levels are row bands (None where none is); ValueError unless every level is
    one and their rows partition the tensor's ``rows``."""
    masked = [getattr(lv, "row_mask", None) is not None for lv in levels]
    if not any(masked):
        return None
    if not all(masked):
        raise ValueError("row bands mixed with whole-tensor levels")
    ids = [lv.row_ids() for lv in levels]
    for lv, i in zip(levels, ids):
        if lv.tensor_rows != rows or len(lv.row_mask) != (rows + 7) // 8 or len(i) != lv.rows:
            raise ValueError(f"a row band's mask does not match its {lv.rows} rows of {rows}")
    seen = np.zeros(rows, np.int32)
    for i in ids:
        seen[i] += 1
    if not (seen == 1).all():
        raise ValueError("row bands do not partition the tensor's rows")
    return ids


@dataclass
class TensorCode:
    """Every level of one tensor, plus what the planner measured."""

    shape: tuple[int, int]
    levels: list[Level]
    # per-level relative error after adding that level (same order as levels), and the target
    errors: list[float] = field(default_factory=list)
    tau: float | None = None
