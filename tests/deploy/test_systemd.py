"""systemd/harmony-agent.service: what systemd-analyze and the shutdown-budget rule say of it."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.deploy.budget import DEFAULT_MAX_STOP_TIMEOUT, shutdown_budget
from scores.duration import parse_duration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "harmony-agent.service"
DROPIN = ROOT / "systemd" / "harmony-agent.service.d" / "workloads.conf"
EXEC = "/opt/harmony-agent/bin/harmony-agent"


def _service(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return dict(parser["Service"])


def _verify(tmp_path: Path, unit_text: str, dropin: str | None = None) -> str:
    """Run systemd-analyze verify on a copy (ExecStart pointing at this venv's binary);
    return every complaint that names one of our files."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    binary = Path(sys.executable).parent / "harmony-agent"
    unit = tmp_path / "harmony-agent.service"
    unit.write_text(unit_text.replace(EXEC, str(binary)))
    if dropin is not None:
        (tmp_path / "harmony-agent.service.d").mkdir()
        (tmp_path / "harmony-agent.service.d" / "workloads.conf").write_text(dropin)
    result = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        # Unit search path: our directory first (so the drop-in is read), then the defaults.
        env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"},
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if str(tmp_path) in line
    ]
    if result.returncode != 0:
        complaints.append(f"exit {result.returncode}")
    return "\n".join(complaints)


def test_unit_verifies(tmp_path: Path) -> None:
    assert _verify(tmp_path, UNIT.read_text()) == ""


def test_unit_with_the_documented_dropin_verifies(tmp_path: Path) -> None:
    assert _verify(tmp_path, UNIT.read_text(), DROPIN.read_text()) == ""


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive is reported."""
    broken = UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs=")
    assert "WatchdogSecs" in _verify(tmp_path, broken)


def test_notify_watchdog_and_restart_policy() -> None:
    service = _service(UNIT.read_text())
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    # The control loop pings at least every second (min(1 s, ttl/3)); the watchdog must
    # leave room for a loaded machine but still catch a wedged loop.
    assert 10 <= parse_duration(service["WatchdogSec"]) <= 60
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # bad configuration: do not loop


def test_stop_timeout_covers_the_shutdown_budget() -> None:
    """TimeoutStopSec >= max(stop_timeout) + 15 s, in the unit and in the drop-in example."""
    unit = _service(UNIT.read_text())
    assert parse_duration(unit["TimeoutStopSec"]) >= shutdown_budget(DEFAULT_MAX_STOP_TIMEOUT)
    dropin = _service(DROPIN.read_text())
    assert parse_duration(dropin["TimeoutStopSec"]) >= shutdown_budget(60)
    assert shutdown_budget(8) == 23 and shutdown_budget(0.5) == 16
    # Only the agent gets SIGTERM: it stops each workload within its stop_timeout. With
    # control-group systemd would SIGTERM the fence and every workload at the same moment.
    assert unit["KillMode"] == "mixed"


def test_unprivileged_with_only_the_workload_capabilities() -> None:
    service = _service(UNIT.read_text())
    assert service["User"] == "harmony-agent" and service["Group"] == "harmony-agent"
    wanted = {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"}
    assert set(service["AmbientCapabilities"].split()) == wanted
    assert set(service["CapabilityBoundingSet"].split()) == wanted
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/harmony-agent" in service["ReadWritePaths"].split()
