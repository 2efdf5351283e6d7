"""``mmt info``: which compute paths this installation uses (native kernels, BLAS, GPU kernels) and why."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import mlx.core as mx

from mmt_mlx import __version__, blas, native
from mmt_mlx.fgs.runtime import kernels as K

_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "sve")


def cpu_features() -> list[str]:
    """The CPU's SIMD features that matter to the kernels (from /proc/cpuinfo on Linux)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return ["neon"] if platform.machine() in ("arm64", "aarch64") else []
    flags: set[str] = set()
    for line in info.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in _FLAGS if f in flags]


def collect() -> dict[str, object]:
    nat = native.describe()
    return {
        "mmt_mlx": __version__,
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "cpu_features": cpu_features(),
        "fgs_gpu_kernels": K.use_kernels(),
        "quant_product": nat,
        "blas": blas.loaded
        or ("Accelerate" if platform.system() == "Darwin" else "MLX's bundled reference BLAS"),
    }


def cmd_info(a: argparse.Namespace) -> int:
    info = collect()
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    nat = info["quant_product"]
    assert isinstance(nat, dict)
    print(f"mmt_mlx {info['mmt_mlx']}, mlx {info['mlx']}, device {info['device']} ({info['machine']})")
    print(f"CPU features: {', '.join(info['cpu_features']) or 'none detected'}")  # type: ignore[arg-type]
    print(f"FGS GPU kernels (Metal/CUDA): {'yes' if info['fgs_gpu_kernels'] else 'no (MLX reference ops)'}")
    line = f"quant level product: {nat['path']}"
    if "isa" in nat:
        line += f" [{nat['isa']}, {nat['threads']} threads]"
    if nat.get("reason"):
        line += f" ({nat['reason']})"
    print(line + f"; MMT_NATIVE={nat['mode']}")
    if "fused_decode_layers" in nat:
        on = nat["fused_decode_layers"]
        print(f"decode: {'one native node per layer for a lone token' if on else 'separate per-op nodes'}"
              f" (MMT_FUSED_LAYER={'1' if on else '0'})")  # fmt: skip
    print(f"f32 GEMM BLAS: {info['blas']}")
    return 0


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="which compute paths and CPU features are in use")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
