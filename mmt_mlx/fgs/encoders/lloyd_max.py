"""Lloyd-Max levels of a standard normal: the scalar Gaussian codes of the rotq level and the union codebook
the trellis codes start from."""

from __future__ import annotations

from functools import cache

import numpy as np


@cache
def lloyd_max(bits: int) -> np.ndarray:
    """The 2**bits Lloyd-Max (MSE-optimal scalar) levels of a standard normal, sorted, float32."""
    if bits < 1 or bits > 8:
        raise ValueError("codebook bits must be in 1..8")
    x = np.linspace(-8.0, 8.0, 64_001)
    p = np.exp(-0.5 * x * x)
    n = 1 << bits
    c = np.linspace(-2.5, 2.5, n) if n > 2 else np.array([-0.8, 0.8])
    for _ in range(400):  # centroid condition <-> nearest-neighbour condition
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        mass = np.bincount(idx, weights=p, minlength=n)
        c_new = np.bincount(idx, weights=p * x, minlength=n) / mass
        if np.max(np.abs(c_new - c)) < 1e-10:
            c = c_new
            break
        c = c_new
    c = (c - c[::-1]) / 2  # exact symmetry
    return c.astype(np.float32)
