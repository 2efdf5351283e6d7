"""A tensor coded by row bands (``codes.row_bands``): each band is a level over some of the tensor's rows, at its
own width. Products run band by band and the outputs are put back in row order with one gather; looked-up rows
are decoded by the band that holds each."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn


def band_order_inverse(row_ids: list[np.ndarray]) -> np.ndarray:
    """inv (int32) such that y_bands[..., inv] puts outputs computed band after band back in row order."""
    order = np.concatenate(row_ids)
    inv = np.empty(len(order), np.int32)
    inv[order] = np.arange(len(order), dtype=np.int32)
    return inv


class _Index:
    """Row-order maps (a plain object, so that nn.Module does not count them among the model's parameters)."""

    def __init__(self, row_ids: list[np.ndarray], rows: int) -> None:
        inv = band_order_inverse(row_ids)
        band = np.empty(rows, np.int32)
        local = np.empty(rows, np.int32)
        for k, ids in enumerate(row_ids):
            band[ids] = k
            local[ids] = np.arange(len(ids), dtype=np.int32)
        self.inv, self.band, self.local = mx.array(inv), mx.array(band), mx.array(local)


class RowBands(nn.Module):
    """W (rows, cols) whose rows ``row_ids[k]`` (ascending) are coded by ``bands[k]``."""

    def __init__(self, bands: list[nn.Module], row_ids: list[np.ndarray], rows: int) -> None:
        super().__init__()
        self.bands = bands
        self.sizes = [len(i) for i in row_ids]
        self._index = _Index(row_ids, rows)

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.concatenate([b(x) for b in self.bands], axis=-1)  # rows in band order
        return mx.take(y, self._index.inv, axis=-1)

    def decode_rows(self, ids: mx.array) -> mx.array:
        """Rows ``ids`` (n,) of W, (n, cols) f32: each decoded by its band (every band decodes the clamped ids;
        lookups are few rows)."""
        band = mx.take(self._index.band, ids)[:, None]
        local = mx.take(self._index.local, ids)
        out = None
        for k, (b, n) in enumerate(zip(self.bands, self.sizes)):
            rows = b.decode_rows(mx.minimum(local, n - 1))
            out = rows if out is None else mx.where(band == k, rows, out)
        return out
