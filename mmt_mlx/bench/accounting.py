"""Weight bytes a model stores and reads per decoded token, and its FLOPs per token (MLX models and GGUF files)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mmt_mlx.fgs.codec import tensor_nbytes
from mmt_mlx.fgs.runtime.layers import FGSEmbedding, FGSLinear
from mmt_mlx.gguf_file import GGUFFile


def _arrays(m: nn.Module) -> dict[str, mx.array]:
    """The module's own arrays (not its children's)."""
    return {k: v for k, v in m.items() if isinstance(v, mx.array)}


def _half_bytes(a: mx.array) -> int:
    """Bytes of an array held in half precision on a GPU (MLX's compute dtype there is bf16)."""
    return a.size * 2 if mx.issubdtype(a.dtype, mx.floating) else a.nbytes


def weight_bytes(model: nn.Module, codes: dict | None = None, attention_ctx: int = 0) -> dict:
    """Stored bytes, bytes read per decoded token (as run here and as held on Apple GPUs) and FLOPs per
    decoded token of a model. ``codes`` ({weight name: TensorCode}) gives FGS layers their stored code size;
    without it their runtime arrays count. FLOPs: 2 per weight of every matrix product (FGS layers at their
    dense shape: the quant level is dense-shaped, the structured levels add less) plus attention at
    ``attention_ctx`` cached positions."""
    tied = "lm_head" not in model  # no separate head: the embedding table doubles as the LM head
    stored = per_tok = per_tok_apple = flops = 0.0
    fgs_prefixes: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in fgs_prefixes):
            continue  # levels of an FGS layer, counted with it
        own = _arrays(m)
        if isinstance(m, (FGSLinear, FGSEmbedding)):
            fgs_prefixes.append(name)
            code = (codes or {}).get(f"{name}.weight")
            if code is not None:
                b = tensor_nbytes(code)
            else:
                b = sum(a.nbytes for lv in m.levels for a in _arrays(lv).values())
            b += sum(a.nbytes for a in own.values())  # bias
            bh = b  # codes are read as stored on every backend
            emb = isinstance(m, FGSEmbedding)
            rows, cols = (m.num_embeddings, m.dims) if emb else (m.out_features, m.in_features)
        elif isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            b = sum(a.size * 2 if k in ("scales", "biases") else a.nbytes for k, a in own.items())
            bh = b
            emb = isinstance(m, nn.QuantizedEmbedding)
            rows, cols = m.weight.shape[0], m.weight.shape[1] * 32 // m.bits
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            b = sum(a.nbytes for a in own.values())
            bh = sum(_half_bytes(a) for a in own.values())
            emb = isinstance(m, nn.Embedding)
            rows, cols = m.weight.shape
        else:  # norms and other small tensors: read whole every step
            b = sum(a.nbytes for a in own.values())
            stored += b
            per_tok += b
            per_tok_apple += sum(_half_bytes(a) for a in own.values())
            continue
        stored += b
        if emb:  # the lookup reads one row; a tied head reads the whole table
            per_tok += b / rows + (b if tied else 0)
            per_tok_apple += bh / rows + (bh if tied else 0)
            flops += 2 * rows * cols if tied else 0
        else:
            per_tok += b
            per_tok_apple += bh
            flops += 2 * rows * cols
    args = getattr(model, "args", None)
    if args is not None and attention_ctx > 0:  # q.k and p.v per head per cached position
        flops += 4 * args.num_hidden_layers * args.num_attention_heads * args.head_dim * attention_ctx
    return {"stored_bytes": int(stored), "bytes_per_token": per_tok, "apple_bytes_per_token": per_tok_apple,
            "flops_per_token": flops}  # fmt: skip


def gguf_weight_bytes(path: str | Path) -> dict:
    """The same accounting for llama.cpp on a GGUF file: every tensor as stored, one embedding row per token,
    the whole table again when there is no separate output matrix (tied head)."""
    tensors = GGUFFile(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    stored = per_tok = 0.0
    for t in tensors:
        stored += t.n_bytes
        if t.name == "token_embd.weight":
            per_tok += t.n_bytes / t.shape[0] + (t.n_bytes if tied else 0)
        else:
            per_tok += t.n_bytes
    return {"stored_bytes": int(stored), "bytes_per_token": per_tok, "apple_bytes_per_token": per_tok}
