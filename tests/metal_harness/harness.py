"""Compile the exact text of mmt_mlx's Metal and CUDA kernel bodies with g++ and run them on the CPU.

Each Metal body is wrapped the way ``mx.fast.metal_kernel`` wraps it: a (templated, when the call passes
template ints) function whose parameters are the inputs as ``const device T*``, the outputs as
``device T*``, then only the thread-id attributes the body names. The Metal address-space words are
macros only around the kernel text (``threadgroup`` -> ``static``: storage shared by a group's threads),
undefined afterwards so they never touch the standard headers. metal_compat.h runs the grid.
A CUDA body is wrapped as MLX's ``mx.fast.cuda_kernel`` wraps it (template ints as ``constexpr int`` lines at
the top of the body; ``threadIdx`` / ``blockIdx`` / ``blockDim`` from the same grid; cuda_compat.h).
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
_CTYPES = {"float32": "float", "int32": "int32_t", "uint8": "uint8_t", "uint32": "uint32_t"}
_NP = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "uint32": np.uint32}
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


def _entry(name: str, template: tuple[tuple[str, int], ...], lang: str = "metal") -> str:
    return ("run_" if lang == "metal" else "cuda_") + name + "".join(f"__{k}_{v}" for k, v in template)


def _launcher(entry: str, nbuf: int, call: str) -> str:
    return f"""
extern "C" int {entry}(void** bufs, const unsigned* g, const unsigned* tg) {{
  (void)sizeof(bufs[{nbuf - 1}]);
  try {{
    metal::harness::launch(uint3{{g[0], g[1], g[2]}}, uint3{{tg[0], tg[1], tg[2]}},
        [&](const metal::harness::ThreadIds& ids) {{
          {call};
        }});
    return 0;
  }} catch (...) {{
    return 1;
  }}
}}
"""


def _buffer_casts(name: str, out_dtype: str) -> list[str]:
    spec = SPECS[name]
    casts = [f"({_CTYPES[dt]}*)bufs[{i}]" for i, (_, dt) in enumerate(spec.inputs)]
    return casts + [f"({_CTYPES[out_dtype]}*)bufs[{len(spec.inputs) + i}]" for i in range(len(spec.outputs))]


def wrap_cuda_kernel(name: str, template: tuple[tuple[str, int], ...], out_dtype: str = "float32") -> str:
    """C++ for one instantiation of a CUDA body, plus an extern "C" launcher on the same grid."""
    spec = SPECS[name]
    ns = "k_" + _entry(name, template, "cuda")
    params = [f"const {_CTYPES[dt]}* {n}" for n, dt in spec.inputs]
    params += [f"{_CTYPES[out_dtype]}* {n}" for n in spec.outputs]
    params += ["dim3 threadIdx", "dim3 blockIdx", "dim3 blockDim"]
    consts = "".join(f"  constexpr int {k} = {v};\n" for k, v in template)
    casts = _buffer_casts(name, out_dtype)
    casts += [
        "ids.thread_position_in_threadgroup",
        "ids.threadgroup_position_in_grid",
        "ids.threads_per_threadgroup",
    ]
    return f"""
namespace {ns} {{
using namespace cuda_harness;
#define __shared__ static
void custom_kernel_{name}(
    {("," + chr(10) + "    ").join(params)}) {{
  (void)blockDim;
{consts}
{kernel_source(name, "cu")}
}}
#undef __shared__
}}  // namespace {ns}
""" + _launcher(
        _entry(name, template, "cuda"), len(casts) - 3, f"{ns}::custom_kernel_{name}({', '.join(casts)})"
    )


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
    casts = _buffer_casts(name, out_dtype) + [f"ids.{a}" for a, _ in attrs]
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
""" + _launcher(_entry(name, template), nbuf, f"{ns}::custom_kernel_{name}{targs}({', '.join(casts)})")


@dataclass
class HarnessLib:
    lib: ctypes.CDLL
    lang: str = "metal"  # which text of the kernels it runs: "metal" or "cuda"

    def run(self, launch: Launch, inputs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        """Run one kernel over launch.grid; inputs in the spec's order, cast to the spec's dtypes."""
        spec = SPECS[launch.name]
        arrs = [np.ascontiguousarray(a, dtype=_NP[dt]) for a, (_, dt) in zip(inputs, spec.inputs)]
        out = np.full(out_shape, np.nan, dtype=np.float32)  # NaN marks anything the kernel forgot
        ptrs = (ctypes.c_void_p * (len(arrs) + 1))(*[a.ctypes.data for a in arrs], out.ctypes.data)
        grid = (ctypes.c_uint * 3)(*launch.grid)
        group = (ctypes.c_uint * 3)(*launch.threadgroup)
        fn = getattr(self.lib, _entry(launch.name, launch.template, self.lang))
        if fn(ptrs, grid, group) != 0:
            raise RuntimeError(f"harness launch of {launch.name} failed")
        return out


def build(
    instances: list[tuple[str, tuple[tuple[str, int], ...]]], workdir: Path, lang: str = "metal"
) -> HarnessLib:
    """Compile every (kernel name, template) instance of the Metal or the CUDA text into one shared library
    (cached by source hash)."""
    if lang == "metal":
        src = '#include "metal_compat.h"\n' + "".join(wrap_kernel(n, t) for n, t in instances)
    else:
        src = '#include "cuda_compat.h"\n' + "".join(wrap_cuda_kernel(n, t) for n, t in instances)
    compat = (HERE / "metal_compat.h").read_text() + (HERE / "cuda_compat.h").read_text()
    key = hashlib.sha256((src + compat).encode()).hexdigest()[:16]
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
    return HarnessLib(ctypes.CDLL(str(so)), lang)
