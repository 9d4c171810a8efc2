"""What an installer meets: the console script and the systemd unit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


# The systemd unit is tested in tests/deploy/test_systemd.py.
