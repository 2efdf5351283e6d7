"""What an FGS code costs and what it decodes to: stored bytes and the numpy reference decode of every level
kind (the oracle the MLX runtime and the kernels are tested against)."""

from __future__ import annotations

import numpy as np

from mmt_mlx.fgs.codes import CirculantCode, GaussianCode, Level, QuantCode, RotQCode, TensorCode, level_shape
from mmt_mlx.fgs.encoders.circulant import circulant_nbytes, decode_circulant
from mmt_mlx.fgs.encoders.gauss_codes import decode_rotq, rotq_code_nbytes
from mmt_mlx.fgs.encoders.gaussian import decode_gaussian, gaussian_nbytes
from mmt_mlx.fgs.encoders.quant import dequantize


def _quant_nbytes(level: QuantCode) -> int:
    return int(level.wq.nbytes + level.scales.nbytes + level.biases.nbytes)


# level type -> (stored bytes, dense decode): the one table every level kind is registered in
_LEVEL_OPS = {
    QuantCode: (_quant_nbytes, dequantize),
    GaussianCode: (gaussian_nbytes, decode_gaussian),
    CirculantCode: (circulant_nbytes, decode_circulant),
    RotQCode: (rotq_code_nbytes, decode_rotq),
}


def _ops(level: Level):
    ops = _LEVEL_OPS.get(type(level))
    if ops is None:
        raise TypeError(type(level))
    return ops


def code_nbytes(level: Level) -> int:
    """Stored bytes of one level: the sum of every array it holds."""
    return int(_ops(level)[0](level))


def tensor_nbytes(tc: TensorCode) -> int:
    return sum(code_nbytes(lv) for lv in tc.levels)


def decode_level(level: Level) -> np.ndarray:
    """The level's dense decode in the tensor's shape (a row band's rows placed, zero elsewhere)."""
    w = _ops(level)[1](level)
    ids = level.row_ids() if isinstance(level, RotQCode) else None
    if ids is None:
        return w
    out = np.zeros(level_shape(level), np.float32)
    out[ids] = w
    return out


def decode_tensor(tc: TensorCode) -> np.ndarray:
    out = np.zeros(tc.shape, dtype=np.float32)
    for lv in tc.levels:
        out += decode_level(lv)
    return out
