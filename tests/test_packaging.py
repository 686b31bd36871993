"""The declared torch floor is the version the README's test command (and so CI) installs.

An untested floor promises users a torch the code was never run on: the first version declared
``torch>=2.4``, while the fused update uses ``torch._dynamo.config.recompile_limit``, a name
torch 2.6 does not know yet.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _declared_floor() -> tuple[int, int]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\b", d)]
    match = re.fullmatch(r"torch>=(\d+)\.(\d+)", torch_dep.replace(" ", ""))
    assert match, f"the torch requirement should be a plain floor 'torch>=X.Y', got {torch_dep!r}"
    return int(match[1]), int(match[2])


def _tested_version() -> tuple[int, int]:
    readme = (ROOT / "README.md").read_text()
    pins = set(re.findall(r"pip install torch==(\d+)\.(\d+)\.\d+", readme))
    assert len(pins) == 1, f"the README's commands should pin one torch version, found {sorted(pins)}"
    (major, minor), = pins
    return int(major), int(minor)


def test_torch_floor_is_the_tested_version():
    assert _declared_floor() == _tested_version()


def test_installed_torch_meets_the_floor():
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= _declared_floor()


def test_the_wheel_ships_the_cpu_kernel_source(tmp_path):
    """The CPU kernel is compiled on the user's machine from ``kernels/native.c``: a wheel without it
    would fall back to the slow path on every install."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("refadamw-*.whl")
    assert "refadamw/kernels/native.c" in zipfile.ZipFile(wheel).namelist()
