"""SystemdUnit through LinuxSshTopology: real sshd, real unit files, a systemctl shim."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scores.base import RunContext, WorkloadState
from scores.check import interpret_for
from scores.systemd import SystemdUnitInterpret, SystemdUnitSpec
from tests.topologies.conftest import Sshd
from topologies.ssh import LinuxSshTopology


@pytest.fixture
async def unit(sshd: Sshd) -> AsyncIterator[SystemdUnitInterpret]:
    topology = LinuxSshTopology(sshd.config())
    spec = SystemdUnitSpec.model_validate(
        {"kind": "SystemdUnit", "unit": "ledger.service", "exec_start": ["/usr/bin/sleep", "60"]}
    )
    interpret = interpret_for(spec, topology, app="ledger", site="site-a")
    assert isinstance(interpret, SystemdUnitInterpret)
    yield interpret
    await topology.close()


def _ctx(tmp_path: Path, token: int) -> RunContext:
    return RunContext("ledger", "site-a", "node-1", token, tmp_path)


async def test_apply_installs_reloads_and_starts(
    unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path
) -> None:
    assert (await unit.observe()).state is WorkloadState.STOPPED
    outcome = await unit.apply(_ctx(tmp_path, 7))
    assert outcome.ok and outcome.changed, outcome
    installed = (sshd.unit_dir / "ledger.service").read_text()
    assert "ExecStart=/usr/bin/sleep 60" in installed
    assert 'Environment="HARMONY_FENCING_TOKEN=7"' in installed
    assert sshd.systemctl_calls()[-2:] == ["daemon-reload", "restart ledger.service"]

    seen = await unit.observe()
    assert seen.state is WorkloadState.RUNNING
    assert seen.pids == (4242,)


async def test_apply_is_idempotent_until_the_unit_changes(
    unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path
) -> None:
    await unit.apply(_ctx(tmp_path, 7))
    calls = len(sshd.systemctl_calls())
    again = await unit.apply(_ctx(tmp_path, 7))
    assert again.ok and not again.changed
    assert "daemon-reload" not in sshd.systemctl_calls()[calls:]

    new_holder = await unit.apply(_ctx(tmp_path, 8))
    assert new_holder.changed
    assert sshd.systemctl_calls()[-2:] == ["daemon-reload", "restart ledger.service"]
    assert "HARMONY_FENCING_TOKEN=8" in (sshd.unit_dir / "ledger.service").read_text()


async def test_stop_and_uninstall(unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path) -> None:
    assert not (await unit.stop()).changed, "nothing installed, nothing to stop"
    await unit.apply(_ctx(tmp_path, 7))
    stopped = await unit.stop()
    assert stopped.ok and stopped.changed
    assert sshd.systemctl_calls()[-1] == "stop ledger.service"
    assert (await unit.observe()).state is WorkloadState.STOPPED
    removed = await unit.uninstall()
    assert removed.ok
    assert not (sshd.unit_dir / "ledger.service").exists()
    assert (await unit.observe()).reason == "not-found"


async def test_failed_systemctl_is_an_outcome(sshd: Sshd, tmp_path: Path) -> None:
    topology = LinuxSshTopology(sshd.config())
    try:
        spec = SystemdUnitSpec(unit="ghost.service", exec_start=["/bin/true"])
        interpret = spec.interpret(topology)
        (sshd.shim_dir / "unit_dir").write_text(str(tmp_path / "elsewhere"))  # reload sees none
        outcome = await interpret.apply(_ctx(tmp_path, 1))
        assert not outcome.ok
        assert "exited 5" in outcome.message and "not found" in outcome.message
    finally:
        await topology.close()


async def test_a_failed_unit_crosses_the_health_threshold(
    unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path
) -> None:
    """Built-in health as the controller feeds it: every observe() goes to the monitor."""
    from scores.health import HealthSpec
    from scores.probes import health_monitor
    from tests.harness.wait import eventually

    health = HealthSpec(period=0.05, timeout=0.05, start_period=0, failure_threshold=3)
    other = LinuxSshTopology(sshd.config())
    monitor = health_monitor("ledger", health, unit.spec, other, unit)
    try:
        assert monitor.probe is None
        await unit.apply(_ctx(tmp_path, 7))
        monitor.started(_ctx(tmp_path, 7))

        async def fed() -> bool:
            monitor.note(await unit.observe())
            return monitor.verdict().crossed

        assert not await fed()
        await other.systemctl("fail", "ledger.service")  # shim hook: the unit's process died
        await eventually(fed, what="threshold crossed")
        verdict = monitor.verdict()
        assert verdict.last is not None and verdict.last.detail == (
            "ledger.service: failed/failed, result exit-code"
        )
        assert "built-in health failed" in verdict.sentence
    finally:
        await monitor.close()
        await other.close()
