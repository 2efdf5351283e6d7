"""What an FGS code costs and what it decodes to: stored bytes and the numpy reference decode of every level
kind (the oracle the MLX runtime and the kernels are tested against)."""

from __future__ import annotations

import numpy as np

from mmt_mlx.fgs.codes import CirculantCode, GaussianCode, Level, QuantCode, RotQCode, TensorCode
from mmt_mlx.fgs.encoders.circulant import circulant_nbytes, decode_circulant
from mmt_mlx.fgs.encoders.gauss_codes import decode_rotq, rotq_code_nbytes
from mmt_mlx.fgs.encoders.gaussian import decode_gaussian, gaussian_nbytes
from mmt_mlx.fgs.encoders.quant import dequantize


def code_nbytes(level: Level) -> int:
    """Stored bytes of one level: the sum of every array it holds."""
    if isinstance(level, QuantCode):
        return int(level.wq.nbytes + level.scales.nbytes + level.biases.nbytes)
    if isinstance(level, GaussianCode):
        return gaussian_nbytes(level)
    if isinstance(level, CirculantCode):
        return circulant_nbytes(level)
    if isinstance(level, RotQCode):
        return rotq_code_nbytes(level)
    raise TypeError(type(level))


def tensor_nbytes(tc: TensorCode) -> int:
    return sum(code_nbytes(lv) for lv in tc.levels)


def decode_level(level: Level) -> np.ndarray:
    if isinstance(level, QuantCode):
        return dequantize(level)
    if isinstance(level, GaussianCode):
        return decode_gaussian(level)
    if isinstance(level, CirculantCode):
        return decode_circulant(level)
    if isinstance(level, RotQCode):
        return decode_rotq(level)
    raise TypeError(type(level))


def decode_tensor(tc: TensorCode) -> np.ndarray:
    out = np.zeros(tc.shape, dtype=np.float32)
    for lv in tc.levels:
        out += decode_level(lv)
    return out
