"""Builds the optional native CPU kernels (kernels/cpu, an MLX C++ extension) with CMake.

Everything else is declared in pyproject.toml. The extension is optional: when CMake, a C++ compiler, MLX's
CMake files or nanobind are missing, or the build fails, the package installs without it and runs on MLX ops
(mmt_mlx/native.py says so once). MMT_NATIVE_BUILD=0 skips the build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
SOURCE_DIR = ROOT / "kernels" / "cpu"
VERSION_FILE = "_native_mlx_version.txt"  # beside the module: the MLX version it was compiled against
SIDECARS = (VERSION_FILE, "libmmt_blas_shim.so")  # built with the module, installed beside it


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[], optional=True)


class NativeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("MMT_NATIVE_BUILD", "1") == "0":
            raise CompileError("MMT_NATIVE_BUILD=0")
        out = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / "mmt_native"
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "CMakeCache.txt").unlink(
            missing_ok=True
        )  # a cached failed configure (no compiler) never sticks
        rpath = "$ORIGIN/../mlx/lib" if sys.platform.startswith("linux") else "@loader_path/../mlx/lib"
        configure = [
            "cmake", str(SOURCE_DIR), "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}",
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", f"-DCMAKE_INSTALL_RPATH={rpath}",
        ]  # fmt: skip
        try:
            subprocess.run(configure, cwd=tmp, check=True)
            subprocess.run(["cmake", "--build", ".", f"-j{os.cpu_count() or 1}"], cwd=tmp, check=True)
            import mlx.core as mx

            (out / VERSION_FILE).write_text(mx.__version__ + "\n")
        except (OSError, subprocess.CalledProcessError, ImportError) as e:
            raise CompileError(f"native CPU kernels not built: {e}") from e

    def get_outputs(self) -> list[str]:
        outs = super().get_outputs()
        extra = [Path(o).parent / name for o in outs for name in SIDECARS]
        return outs + [str(p) for p in extra if p.exists()]

    def copy_extensions_to_source(self) -> None:  # editable installs: the sidecars go beside the module too
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            for name in SIDECARS:
                src = Path(regular_file).parent / name
                if src.exists():
                    self.copy_file(str(src), str(Path(inplace_file).parent / name), level=self.verbose)


setup(ext_modules=[CMakeExtension("mmt_mlx._native")], cmdclass={"build_ext": NativeBuild})
