"""The distribution: `python -m build` makes a wheel that installs into a clean virtualenv."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent import __version__

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)


def test_wheel_builds_and_installs_into_a_clean_venv(tmp_path: Path) -> None:
    # Build from a copy of the sources (no build/ or egg-info left in the checkout).
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)],
        capture_output=True,
        check=True,
    )
    (wheel,) = dist.glob("harmony_agent-*.whl")
    assert wheel.name.startswith(f"harmony_agent-{__version__}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("agent", "mesh", "scores", "topologies"):
        assert f"{package}/__init__.py" in names and f"{package}/py.typed" in names
    assert not [n for n in names if n.startswith("tests/")]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"{wheel}[embedded]"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    version = subprocess.run(
        [str(venv / "bin" / "harmony-agent"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not the checkout: the installed package must answer
    ).stdout
    assert version.strip() == f"harmony-agent, version {__version__}"
    # The embedded extra brings nats-server beside the interpreter, where the agent looks.
    assert (venv / "bin" / "nats-server").is_file()
    manifests = subprocess.run(
        [str(venv / "bin" / "harmony-agent"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert "  run" in manifests
