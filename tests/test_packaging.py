"""The wheel carries the kernels and the server under mmt_mlx; the README's test command is what CI runs."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_test_command_is_ci_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = [c for c in commands if "pytest" in c]
    assert test_cmd, "README has no test command"
    assert test_cmd[0].strip() in ci


def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)  # fmt: skip
    wheel = next(tmp_path.glob("mmt_mlx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"mmt_mlx"}  # no bare `server` or `kernels`
    for needed in ("mmt_mlx/kernels/gaussian_matmul.metal", "mmt_mlx/kernels/gaussian_matmul.cu",
                   "mmt_mlx/kernels/circulant_matmul.metal", "mmt_mlx/kernels/circulant_matmul.cu",
                   "mmt_mlx/kernels/rotq_matmul.metal", "mmt_mlx/kernels/rotq_matmul.cu",
                   "mmt_mlx/kernels/rotation.metal", "mmt_mlx/kernels/rotation.cu",
                   "mmt_mlx/server/app.py", "mmt_mlx/data/calibration.txt", "mmt_mlx/data/heldout.txt"):  # fmt: skip
        assert needed in names, needed
    for f in (ROOT / "kernels" / "cpu").iterdir():  # every native kernel source (an .inc forgotten once)
        assert f"mmt_mlx/kernels/cpu/{f.name}" in names, f
    # every module of the package tree (pyproject lists the subpackages one by one)
    for f in (ROOT / "mmt_mlx").rglob("*.py"):
        assert f.relative_to(ROOT).as_posix() in names, f
