"""Calibration hooks: a layer wrapper that sees every input of a Linear (or of the tied embedding's head)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class InputRecorder(nn.Module):
    """Wraps a Linear/Embedding; subclasses say what to keep of each input in ``_record``.

    Embedding lookups are not recorded (their input is token ids); the tied head's ``as_linear`` is.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def _record(self, x: mx.array) -> None:
        raise NotImplementedError

    def __call__(self, x: mx.array) -> mx.array:
        if isinstance(self.inner, nn.Embedding):
            return self.inner(x)
        self._record(x)
        return self.inner(x)

    def as_linear(self, x: mx.array) -> mx.array:
        self._record(x)
        return self.inner.as_linear(x)
