"""Compile the exact text of mmt_mlx's Metal kernel bodies with g++ and run them on the CPU.

Each body is wrapped the way ``mx.fast.metal_kernel`` wraps it: a (templated, when the call passes
template ints) function whose parameters are the inputs as ``const device T*``, the outputs as
``device T*``, then only the thread-id attributes the body names. The Metal address-space words are
macros only around the kernel text (``threadgroup`` -> ``static``: storage shared by a group's threads),
undefined afterwards so they never touch the standard headers. metal_compat.h runs the grid.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmt_mlx.fgs.runtime.kernels import SPECS, Launch, kernel_source

HERE = Path(__file__).resolve().parent
_CTYPES = {"float32": "float", "int32": "int32_t", "uint8": "uint8_t"}
_NP = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8}
# attribute name -> C type, in the order MLX appends them to the signature
_ATTRS = (
    ("thread_position_in_grid", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threads_per_threadgroup", "uint3"),
    ("thread_index_in_threadgroup", "uint"),
)


def gxx_available() -> bool:
    return shutil.which("g++") is not None


def _entry(name: str, template: tuple[tuple[str, int], ...]) -> str:
    return "run_" + name + "".join(f"__{k}_{v}" for k, v in template)


def wrap_kernel(name: str, template: tuple[tuple[str, int], ...], out_dtype: str = "float32") -> str:
    """C++ for one instantiation: the body inside an MLX-style signature, plus an extern "C" launcher."""
    spec = SPECS[name]
    body = kernel_source(name, "metal")
    ns = "k_" + _entry(name, template)
    params = [f"const device {_CTYPES[dt]}* {n}" for n, dt in spec.inputs]
    params += [f"device {_CTYPES[out_dtype]}* {n}" for n in spec.outputs]
    attrs = [(a, t) for a, t in _ATTRS if a in body]
    params += [f"{t} {a}" for a, t in attrs]
    tmpl = "template <" + ", ".join(f"int {k}" for k, _ in template) + ">\n" if template else ""
    targs = "<" + ", ".join(str(v) for _, v in template) + ">" if template else ""
    nbuf = len(spec.inputs) + len(spec.outputs)
    casts = [f"({_CTYPES[dt]}*)bufs[{i}]" for i, (_, dt) in enumerate(spec.inputs)]
    casts += [f"({_CTYPES[out_dtype]}*)bufs[{len(spec.inputs) + i}]" for i in range(len(spec.outputs))]
    casts += [f"ids.{a}" for a, _ in attrs]
    return f"""
namespace {ns} {{
#define device
#define constant
#define thread
#define threadgroup static
{tmpl}void custom_kernel_{name}(
    {("," + chr(10) + "    ").join(params)}) {{
{body}
}}
#undef device
#undef constant
#undef thread
#undef threadgroup
}}  // namespace {ns}

extern "C" int {_entry(name, template)}(void** bufs, const unsigned* g, const unsigned* tg) {{
  (void)sizeof(bufs[{nbuf - 1}]);
  try {{
    metal::harness::launch(uint3{{g[0], g[1], g[2]}}, uint3{{tg[0], tg[1], tg[2]}},
        [&](const metal::harness::ThreadIds& ids) {{
          {ns}::custom_kernel_{name}{targs}({", ".join(casts)});
        }});
    return 0;
  }} catch (...) {{
    return 1;
  }}
}}
"""


@dataclass
class HarnessLib:
    lib: ctypes.CDLL

    def run(self, launch: Launch, inputs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        """Run one kernel over launch.grid; inputs in the spec's order, cast to the spec's dtypes."""
        spec = SPECS[launch.name]
        arrs = [np.ascontiguousarray(a, dtype=_NP[dt]) for a, (_, dt) in zip(inputs, spec.inputs)]
        out = np.full(out_shape, np.nan, dtype=np.float32)  # NaN marks anything the kernel forgot
        ptrs = (ctypes.c_void_p * (len(arrs) + 1))(*[a.ctypes.data for a in arrs], out.ctypes.data)
        grid = (ctypes.c_uint * 3)(*launch.grid)
        group = (ctypes.c_uint * 3)(*launch.threadgroup)
        fn = getattr(self.lib, _entry(launch.name, launch.template))
        if fn(ptrs, grid, group) != 0:
            raise RuntimeError(f"harness launch of {launch.name} failed")
        return out


def build(instances: list[tuple[str, tuple[tuple[str, int], ...]]], workdir: Path) -> HarnessLib:
    """Compile every (kernel name, template) instance into one shared library (cached by source hash)."""
    src = '#include "metal_compat.h"\n' + "".join(wrap_kernel(n, t) for n, t in instances)
    key = hashlib.sha256((src + (HERE / "metal_compat.h").read_text()).encode()).hexdigest()[:16]
    workdir.mkdir(parents=True, exist_ok=True)
    cpp = workdir / f"harness_{key}.cpp"
    so = workdir / f"harness_{key}.so"
    if not so.exists():
        cpp.write_text(src)
        cmd = [
            "g++",
            "-std=c++20",
            "-O1",
            "-shared",
            "-fPIC",
            "-pthread",
            f"-I{HERE}",
            str(cpp),
            "-o",
            str(so),
        ]
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"g++ failed:\n{res.stderr[-4000:]}")
    return HarnessLib(ctypes.CDLL(str(so)))
