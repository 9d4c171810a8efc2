"""SystemdUnit's fence: a transient timer stops the unit at the lease deadline.

Against the systemd shims behind a real sshd (``conftest.py``): ``systemd-run`` there starts
a detached sleeper that runs the fence command when the timer elapses, so the fence works
without the agent, as with systemd. The timer and service the agent creates are checked
with ``systemd-analyze verify`` where it is installed. A real systemd is used by
``test_systemd_real.py`` when one is reachable.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scores.base import Deadline, RunContext, WorkloadState
from scores.health import FENCE_LEAD, deadline_clock
from scores.systemd import (
    ARM_SCRIPT,
    FENCE_SCRIPT,
    SystemdUnitInterpret,
    SystemdUnitSpec,
    fence_run_argv,
    fence_slots,
    fence_unit_files,
)
from tests.harness.wait import eventually
from tests.topologies.conftest import Sshd
from topologies.ssh import LinuxSshTopology

UNIT = "ledger.service"
A, B = (f"{slot}.timer" for slot in fence_slots(UNIT))
SPEC = SystemdUnitSpec(unit=UNIT, exec_start=["/usr/bin/sleep", "600"])
ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture
async def unit(sshd: Sshd) -> AsyncIterator[SystemdUnitInterpret]:
    topology = LinuxSshTopology(sshd.config())
    interpret = SPEC.interpret(topology)
    yield interpret
    await interpret.close()
    await topology.close()


def _ctx(tmp_path: Path, deadline: float | None) -> RunContext:
    at = Deadline(deadline) if deadline is not None else None
    return RunContext("ledger", "site-a", "node-1", 7, tmp_path, at)


def _delay_ms(argv: list[str]) -> int:
    (option,) = [a for a in argv if a.startswith("--on-active=")]
    return int(option.removeprefix("--on-active=").removesuffix("ms"))


async def test_fence_is_armed_before_the_unit_starts(
    unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path
) -> None:
    deadline = deadline_clock() + 30
    outcome = await unit.apply(_ctx(tmp_path, deadline))
    assert outcome.ok, outcome
    commands = [" ".join(c[:2]) for c in sshd.commands()]
    assert commands.index("systemd-run --quiet") < commands.index("systemctl restart")
    await unit.fence_settled()  # a slow first round trip is measured, then armed again
    ((armed_name, armed_info),) = sshd.armed_timers().items()
    call = sshd.systemd_run_calls()[-1]
    slot = armed_name.removesuffix(".timer")
    assert ["systemd-run", *call] == fence_run_argv(slot, UNIT, _delay_ms(call))
    assert call[-5:] == ["/bin/sh", "-c", FENCE_SCRIPT, "sh", UNIT]
    assert deadline - 3.0 < armed_info["fire_at"] <= deadline - FENCE_LEAD
    assert sshd.unit_state(UNIT) == "active"
    assert unit.enforces_deadline


async def test_renewals_move_the_fence_and_stop_disarms_it(
    unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path
) -> None:
    first = deadline_clock() + 30
    await unit.apply(_ctx(tmp_path, first))
    await unit.fence_settled()
    ((before, info),) = sshd.armed_timers().items()
    arms = unit.arms
    later = first + 10
    unit.set_deadline(Deadline(later))
    await unit.fence_settled()
    ((now_armed, moved),) = sshd.armed_timers().items()
    assert unit.arms > arms and now_armed != before, "the other slot, the old one stopped"
    assert info["fire_at"] < moved["fire_at"] <= later - FENCE_LEAD
    unit.set_deadline(Deadline(later + 10))
    await unit.fence_settled()
    ((_, again),) = sshd.armed_timers().items()
    assert again["fire_at"] > moved["fire_at"]
    unit.set_deadline(Deadline(later))  # an older deadline never moves the fence back
    arms = unit.arms
    await unit.fence_settled()
    assert unit.arms == arms

    stopped = await unit.stop()
    assert stopped.ok and stopped.changed
    assert sshd.armed_timers() == {}
    assert sshd.commands()[-1] == ["systemctl", "stop", A, B]
    assert (await unit.stop()).ok and not (await unit.stop()).changed
    assert sshd.fired() == [], "no timer fired while renewals came in"


async def test_fence_stops_the_unit_at_the_deadline_and_observe_says_so(
    unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path
) -> None:
    deadline = deadline_clock() + 8  # SSH round trips take 0.2-0.5 s on a loaded machine
    assert (await unit.apply(_ctx(tmp_path, deadline))).ok
    await unit.fence_settled()
    (armed,) = sshd.armed_timers()
    assert (await unit.observe()).state is WorkloadState.RUNNING
    await eventually(lambda: sshd.unit_state(UNIT) == "inactive", timeout=15, what="fence")
    assert [f["timer"] for f in sshd.fired()] == [armed]
    seen = await unit.observe()
    assert (seen.state, seen.reason) == (WorkloadState.FAILED, "deadline")
    assert "stopped at the lease deadline by the fence timer" in seen.detail
    calls = sshd.systemctl_calls()
    assert calls[-2:] == [f"stop --no-block {UNIT}", f"kill --signal=SIGKILL {UNIT}"]
    assert (await unit.stop()).ok and sshd.armed_timers() == {}


async def test_an_unfenced_unit_is_not_started(
    unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path
) -> None:
    broken = sshd.shim_dir / "systemd-run"
    broken.write_text("#!/bin/sh\necho 'Failed to connect to bus: Host is down' >&2\nexit 1\n")
    outcome = await unit.apply(_ctx(tmp_path, deadline_clock() + 30))
    assert not outcome.ok
    assert "cannot arm the fence timer" in outcome.message
    assert "Failed to connect to bus" in outcome.message
    assert outcome.message.endswith("not starting an unfenced unit")
    assert not [c for c in sshd.systemctl_calls() if c.startswith(("start", "restart"))]
    passed = await unit.apply(_ctx(tmp_path, deadline_clock() + 0.1))
    assert not passed.ok and "deadline already passed" in passed.message


async def test_without_a_deadline_there_is_no_fence(
    unit: SystemdUnitInterpret, sshd: Sshd, tmp_path: Path
) -> None:
    await unit.apply(_ctx(tmp_path, deadline_clock() + 30))
    await unit.fence_settled()
    assert len(sshd.armed_timers()) == 1
    unit.set_deadline(None)  # SplitBrainAllowed
    await eventually(lambda: sshd.armed_timers() == {}, what="disarmed")
    unit.set_deadline(Deadline(deadline_clock() + 60))
    assert sshd.armed_timers() == {}
    # An agent that died with a fence armed, restarted for a SplitBrainAllowed run: the
    # old timer must not stop the new, unfenced unit.
    await unit.stop()
    await unit.apply(_ctx(tmp_path, deadline_clock() + 30))
    await unit.fence_settled()
    await unit.close()
    assert len(sshd.armed_timers()) == 1
    topology = LinuxSshTopology(sshd.config())
    try:
        plain = SPEC.interpret(topology)
        assert (await plain.apply(_ctx(tmp_path, None))).ok
        assert sshd.armed_timers() == {}
    finally:
        await topology.close()


AGENT = """
import asyncio, json, sys
from pathlib import Path
from scores.base import Deadline, RunContext
from scores.health import deadline_clock
from scores.systemd import SystemdUnitSpec
from topologies.config import LinuxSshConfig
from topologies.ssh import LinuxSshTopology

async def main() -> None:
    config = LinuxSshConfig.model_validate_json(sys.argv[1])
    spec = SystemdUnitSpec.model_validate_json(sys.argv[2])
    interpret = spec.interpret(LinuxSshTopology(config))
    deadline = deadline_clock() + float(sys.argv[3])
    ctx = RunContext("ledger", "site-a", "n1", 7, Path("/tmp"), Deadline(deadline))
    outcome = await interpret.apply(ctx)
    for step in (1.0, 2.0):  # two renewals, as the lease manager would send them
        interpret.set_deadline(Deadline(deadline + step))
        await interpret.fence_settled()
    print(json.dumps({"ok": outcome.ok, "message": outcome.message, "arms": interpret.arms,
                      "deadline": deadline + 2.0}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def hung_agent_fence(
    config_json: str, spec: SystemdUnitSpec, lead: float
) -> tuple[asyncio.subprocess.Process, dict[str, object]]:
    """Start an agent process that applies the unit under a deadline, then SIGSTOP it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT,
        config_json,
        spec.model_dump_json(by_alias=True),
        str(lead),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.stdout is not None
    info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
    assert info["ok"], info
    os.kill(proc.pid, signal.SIGSTOP)  # hung: no more renewals, no event loop
    return proc, info


async def test_unit_is_stopped_at_the_deadline_while_the_agent_is_sigstopped(
    sshd: Sshd,
) -> None:
    proc, info = await hung_agent_fence(sshd.config().model_dump_json(), SPEC, 6.0)
    try:
        assert sshd.unit_state(UNIT) == "active"
        ((armed, planned),) = sshd.armed_timers().items()  # the last renewal's timer
        await eventually(lambda: sshd.unit_state(UNIT) == "inactive", timeout=15, what="fence")
        deadline = float(str(info["deadline"]))
        stopped_at = sshd.transitions(UNIT)[-1]["at"]
        print(f"unit stopped {1000 * (deadline - stopped_at):.0f} ms before the deadline")
        assert stopped_at <= deadline, "the fence fires before the lease deadline"
        fired = [(f["timer"], f["fire_at"]) for f in sshd.fired()]
        assert fired == [(armed, planned["fire_at"])], "only the last renewal's timer fired"
        assert int(str(info["arms"])) >= 3
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_fence_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    slot = fence_slots(UNIT)[0]
    argv = fence_run_argv(slot, UNIT, 12345)
    files = fence_unit_files(slot, UNIT, 12345)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # The files say what the systemd-run options say.
    timer = files[f"{slot}.timer"]
    assert "OnActiveSec=12345ms" in timer and "--on-active=12345ms" in argv
    assert "AccuracySec=100ms" in timer and "--timer-property=AccuracySec=100ms" in argv
    assert "RemainAfterElapse=no" in timer and "--timer-property=RemainAfterElapse=no" in argv
    assert "CollectMode=inactive-or-failed" in files[f"{slot}.service"] and "--collect" in argv
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in files)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert str(tmp_path) not in result.stderr, result.stderr
    bad = tmp_path / f"{slot}.timer"
    bad.write_text(timer.replace("12345ms", "12345 parsecs"))
    refused = subprocess.run(
        ["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0, "verify would catch a bad timer"


def test_arm_script_keeps_a_timer_armed_at_every_step(tmp_path: Path) -> None:
    """Run ARM_SCRIPT with stand-ins that log: stale slot cleared, new timer, then old one."""
    log = tmp_path / "log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("systemctl", "systemd-run"):
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        tool.chmod(0o755)
    argv = fence_run_argv("harmony-fence-ledger-b", UNIT, 5000)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["sh", "-c", ARM_SCRIPT, "sh", "harmony-fence-ledger-b", "harmony-fence-ledger-a", *argv],
        env=env,
        check=False,
    )
    assert done.returncode == 0
    lines = log.read_text().splitlines()
    assert lines[0] == "systemctl stop harmony-fence-ledger-b.timer"
    assert lines[1].startswith("systemd-run --quiet --collect --unit=harmony-fence-ledger-b ")
    assert lines[2] == "systemctl stop harmony-fence-ledger-a.timer"
    (bin_dir / "systemd-run").write_text("#!/bin/sh\nexit 4\n")
    log.unlink()
    failed = subprocess.run(
        ["sh", "-c", ARM_SCRIPT, "sh", "harmony-fence-ledger-b", "harmony-fence-ledger-a", *argv],
        env=env,
        check=False,
    )
    assert failed.returncode == 4
    assert log.read_text().splitlines() == ["systemctl stop harmony-fence-ledger-b.timer"], (
        "the old timer stays armed when the new one could not be created"
    )
