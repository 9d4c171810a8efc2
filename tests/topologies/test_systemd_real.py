"""SystemdUnit and its fence against a real systemd, over SSH.

Opt-in: ``tests/topologies/systemd-container.sh`` starts systemd 252 in a podman container
(host network, sshd on 127.0.0.1:2299) and prints the ``HARMONY_TEST_SYSTEMD_SSH`` to export.
The container shares this machine's kernel, so its CLOCK_MONOTONIC is ours: the moment
systemd stopped the unit is compared with the deadline the agent gave.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scores.base import Deadline, RunContext, WorkloadState
from scores.health import builtin_failure, deadline_clock
from scores.systemd import SystemdUnitInterpret, SystemdUnitSpec, fence_slots
from tests.harness.wait import eventually
from tests.topologies.test_systemd_fence import hung_agent_fence
from topologies.config import LinuxSshConfig
from topologies.ssh import LinuxSshTopology

CONFIG = os.environ.get("HARMONY_TEST_SYSTEMD_SSH", "")
pytestmark = pytest.mark.skipif(
    not CONFIG,
    reason="no real systemd: run tests/topologies/systemd-container.sh and export "
    "HARMONY_TEST_SYSTEMD_SSH",
)


def _config() -> LinuxSshConfig:
    return LinuxSshConfig.model_validate_json(Path(CONFIG).read_text())


@pytest.fixture
async def real() -> AsyncIterator[tuple[LinuxSshTopology, str]]:
    topology = LinuxSshTopology(_config())
    unit = f"harmony-test-{secrets.token_hex(3)}.service"
    yield topology, unit
    timers = [f"{slot}.timer" for slot in fence_slots(unit)]
    await topology.systemctl("stop", unit, *timers)
    await topology.remove_unit(unit)
    await topology.systemctl("daemon-reload")
    await topology.close()


async def _show(topology: LinuxSshTopology, unit: str, *props: str) -> dict[str, str]:
    result = await topology.systemctl("show", unit, f"--property={','.join(props)}")
    assert result.ok, result.summary()
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


async def _fence_units(topology: LinuxSshTopology, unit: str) -> list[str]:
    stem = unit.removesuffix(".service")
    listed = await topology.systemctl(
        "list-units", "--all", "--plain", "--no-legend", f"harmony-fence-{stem}-*"
    )
    return sorted(line.split()[0] for line in listed.stdout.splitlines() if line.strip())


def _spec(unit: str, **fields: object) -> SystemdUnitSpec:
    return SystemdUnitSpec.model_validate(
        {"unit": unit, "exec_start": ["/usr/bin/sleep", "600"], "restart": "on-failure", **fields}
    )


async def test_renewals_keep_the_unit_running_and_stop_removes_the_fence(
    real: tuple[LinuxSshTopology, str], tmp_path: Path
) -> None:
    topology, unit = real
    interpret = _spec(unit).interpret(topology)
    ctx = RunContext("ledger", "site-a", "n1", 7, tmp_path, Deadline(deadline_clock() + 10))
    assert (await interpret.apply(ctx)).ok
    await interpret.fence_settled()
    pid = (await _show(topology, unit, "MainPID"))["MainPID"]
    took = []
    for step in range(1, 6):
        began = time.monotonic()
        interpret.set_deadline(Deadline(deadline_clock() + 10 + step))
        await interpret.fence_settled()
        took.append(time.monotonic() - began)
        timers = [u for u in await _fence_units(topology, unit) if u.endswith(".timer")]
        assert len(timers) == 1, timers
        state = await _show(topology, timers[0], "ActiveState", "SubState")
        assert state == {"ActiveState": "active", "SubState": "waiting"}
    print(f"re-arming over SSH took {min(took) * 1000:.0f}-{max(took) * 1000:.0f} ms")
    after = await _show(topology, unit, "ActiveState", "MainPID", "NRestarts")
    assert after == {"ActiveState": "active", "MainPID": pid, "NRestarts": "0"}
    assert (await interpret.stop()).ok
    assert await _fence_units(topology, unit) == []
    assert (await _show(topology, unit, "ActiveState"))["ActiveState"] == "inactive"


async def test_unit_is_killed_at_the_deadline_while_the_agent_is_sigstopped(
    real: tuple[LinuxSshTopology, str],
) -> None:
    topology, unit = real
    spec = _spec(unit)
    proc, info = await hung_agent_fence(_config().model_dump_json(), spec, 6.0)
    try:
        pid = (await _show(topology, unit, "MainPID"))["MainPID"]
        assert pid != "0"

        async def stopped() -> bool:
            state = await _show(topology, unit, "ActiveState")
            return state["ActiveState"] in ("inactive", "failed")

        await eventually(stopped, timeout=20, what="systemd to stop the unit")
        # An inactive unit is garbage-collected (its timestamps with it): read the journal.
        journal = await topology.run(["journalctl", "-u", unit, "-o", "json", "--no-pager"])
        entries = [json.loads(line) for line in journal.stdout.splitlines() if line.strip()]
        messages = [(int(e["__MONOTONIC_TIMESTAMP"]) / 1e6, str(e.get("MESSAGE"))) for e in entries]
        ends = [t for t, m in messages if "Deactivated" in m or "Main process exited" in m]
        assert ends, messages
        assert not [m for _, m in messages if "Scheduled restart" in m], "not restarted"
        # Same kernel: CLOCK_MONOTONIC in the container is ours; deadlines are BOOTTIME.
        offset = deadline_clock() - time.monotonic()
        stopped_at = ends[0] + offset
        deadline = float(str(info["deadline"]))
        print(
            f"systemd stopped the unit {1000 * (deadline - stopped_at):.0f} ms before the deadline"
        )
        assert stopped_at <= deadline
        gone = await topology.run(["kill", "-0", pid])
        assert gone.returncode != 0, "the unit's process is gone"
        await eventually(lambda: _fence_units_gone(topology, unit), what="fence units collected")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _fence_units_gone(topology: LinuxSshTopology, unit: str) -> bool:
    return await _fence_units(topology, unit) == []


async def test_a_timer_cannot_be_moved_with_set_property(
    real: tuple[LinuxSshTopology, str],
) -> None:
    """Why each renewal creates a new timer: systemd refuses to change a timer's value."""
    topology, unit = real
    slot = fence_slots(unit)[0]
    made = await topology.run(
        ["systemd-run", "--quiet", "--collect", f"--unit={slot}", "--on-active=600s", "/bin/true"]
    )
    assert made.ok, made.summary()
    moved = await topology.systemctl("set-property", f"{slot}.timer", "OnActiveSec=900s")
    assert not moved.ok and "Cannot set property" in moved.stderr, moved.summary()


async def test_a_failed_unit_is_a_builtin_health_failure(
    real: tuple[LinuxSshTopology, str], tmp_path: Path
) -> None:
    topology, unit = real
    interpret = _spec(unit, exec_start=["/bin/false"], restart="no").interpret(topology)
    assert isinstance(interpret, SystemdUnitInterpret)
    await interpret.apply(RunContext("ledger", "site-a", "n1", 7, tmp_path))

    async def failed() -> bool:
        return (await interpret.observe()).state is WorkloadState.FAILED

    await eventually(failed, what="the unit to fail")
    seen = await interpret.observe()
    assert seen.reason == "failed" and builtin_failure(seen) == seen.detail
    assert "result exit-code" in seen.detail
