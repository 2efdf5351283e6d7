"""A seeded orthogonal FFT rotation of any width (the "Mobius" level): R x = irfft(rfft(D x) * phase).

D is a diagonal of random signs and ``phase`` a unit-modulus spectrum of n//2 + 1 bins: random angles,
except the DC bin (and the Nyquist bin when n is even), which must be real (+-1) for the circulant to be real.
A real circulant whose spectrum has unit modulus is orthogonal, so R = C D is orthogonal and
R^T y = D irfft(rfft(y) * conj(phase)). The transform is stored as its seed only; the runtime rebuilds
``signs`` and ``phase`` from it with this same function, so encoder and decoder always agree.

Rotating a weight's input space, W x = (W R^T)(R x), spreads each row's outliers over every column, so the
rotated rows look like i.i.d. Gaussian samples and a Gaussian-matched codebook fits them.
Pure numpy: knows nothing of models.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def rotation_params(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(signs (n,) float32 of +-1, phase (n//2 + 1,) complex64 of unit modulus) of the rotation (n, seed)."""
    if n < 1:
        raise ValueError("rotation width must be positive")
    rng = np.random.default_rng([0x4D6F62, int(n), int(seed)])  # "Mob", width, seed
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n)
    theta = rng.uniform(0.0, 2.0 * np.pi, size=n // 2 + 1)
    phase = np.exp(1j * theta)
    # bins whose frequency is its own mirror must stay real for a real, orthogonal circulant
    phase[0] = 1.0 if rng.random() < 0.5 else -1.0
    if n % 2 == 0:
        phase[-1] = 1.0 if rng.random() < 0.5 else -1.0
    signs.setflags(write=False)
    phase = phase.astype(np.complex64)
    phase.setflags(write=False)
    return signs, phase


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """R x along the last axis (float64 in, float64 out for float64; float32 otherwise)."""
    n = x.shape[-1]
    signs, phase = rotation_params(n, seed)
    dt = np.float64 if x.dtype == np.float64 else np.float32
    y = np.fft.irfft(np.fft.rfft(x * signs, axis=-1) * phase, n=n, axis=-1)
    return y.astype(dt, copy=False)


def unrotate(y: np.ndarray, seed: int) -> np.ndarray:
    """R^T y along the last axis (the inverse of ``rotate``)."""
    n = y.shape[-1]
    signs, phase = rotation_params(n, seed)
    dt = np.float64 if y.dtype == np.float64 else np.float32
    x = np.fft.irfft(np.fft.rfft(y, axis=-1) * np.conj(phase), n=n, axis=-1) * signs
    return x.astype(dt, copy=False)


def rotate_weight(w: np.ndarray, seed: int) -> np.ndarray:
    """W R^T: the weight that acts on rotated inputs (each row r becomes R r, since (W R^T)^T = R W^T)."""
    return rotate(w, seed)


def rotate_covariance(h: np.ndarray, seed: int) -> np.ndarray:
    """R H R^T: the covariance of the rotated inputs, from the covariance H of the inputs."""
    return rotate(rotate(h, seed).T, seed).T
