"""What an installer meets: the console script and the systemd unit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_console_script_lists_the_contract_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("run", "status", "apply", "delete", "check", "cmd", "demo"):
        assert f"  {command}" in out, f"{command} missing from:\n{out}"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    binary = Path(sys.executable).parent / "harmony-agent"
    unit = (ROOT / "systemd" / "harmony-agent.service").read_text()
    assert "ExecStart=/opt/harmony-agent/bin/harmony-agent run" in unit
    local = tmp_path / "harmony-agent.service"
    local.write_text(unit.replace("/opt/harmony-agent/bin/harmony-agent", str(binary)))
    result = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, check=False
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if local.name in line
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    assert "User=harmony-agent" in unit and "NoNewPrivileges=yes" in unit
