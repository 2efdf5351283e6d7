"""Command-line arguments shared by the ``mmt`` sub-commands (the model argument reads the same everywhere)."""

from __future__ import annotations

import argparse

from mmt_mlx.registry import BUILTINS, DEFAULT_MODEL

MODEL_HELP = (
    f"built-in name ({', '.join(BUILTINS)}; default {DEFAULT_MODEL}), a .gguf file or a model directory"
)


def add_model_arg(p: argparse.ArgumentParser, dense: bool = False) -> None:
    """``--model`` and (``dense``) ``--dense``, the switch from FGS codes to the dequantized source."""
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    if dense:
        p.add_argument(
            "--dense", action="store_true", help="use the dense (dequantized source) model, not FGS codes"
        )
