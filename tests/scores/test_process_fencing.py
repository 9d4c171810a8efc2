"""Process workloads never outlive their agent, nor their deadline while the agent is paused,
nor the fence itself, whatever kills it.

The "agent" here is a real separate Python process under uvloop (as the daemon runs), with
its own fence, so it can be SIGKILLed or SIGSTOPped without taking the test down.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mesh.clock import boottime
from tests.harness.wait import eventually
from tests.scores.conftest import alive

OWNER = """
import asyncio, json, sys
from pathlib import Path
import uvloop
from mesh.clock import boottime
from scores.base import Deadline, RunContext
from scores.process import ProcessSpec
from topologies.localhost import LocalhostTopology

async def main() -> None:
    lead = float(sys.argv[2])
    deadline = Deadline(boottime() + lead) if lead > 0 else None
    topology = LocalhostTopology()
    asyncio.create_task(topology.fence.run())
    await topology.fence.started.wait()
    child = Path(sys.argv[1]) / "child.pid"
    spec = ProcessSpec(command=["sh", "-c", f"sleep 60 & echo $! > {child}; wait"], stop_timeout=1)
    interpret = spec.interpret(topology)
    ctx = RunContext("owned", "site-a", "node-1", 1, Path(sys.argv[1]), deadline)
    outcome = await interpret.apply(ctx)
    if not outcome.ok:
        print(json.dumps({"ok": False, "error": outcome.message}), flush=True)
        await asyncio.Event().wait()
    seen = await interpret.observe()
    while not child.exists() or not child.read_text().strip():
        await asyncio.sleep(0.01)
    print(json.dumps({"ok": outcome.ok, "pid": seen.pids[0], "child": int(child.read_text()),
                      "fence": topology.fence.proc.pid,
                      "deadline": deadline.at if deadline else None}), flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""


@asynccontextmanager
async def owner(
    state: Path, deadline_in: float = 0.0, wrap: tuple[str, ...] = ()
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    proc = await asyncio.create_subprocess_exec(
        *wrap,
        sys.executable,
        "-c",
        OWNER,
        str(state),
        str(deadline_in),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        while not line.startswith(b"{"):  # log lines may come first
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "the owner exited before reporting"
        info = json.loads(line)
        assert info["ok"], info
        yield proc.pid, info
    finally:
        if proc.returncode is None:
            with_kill(proc.pid)
        await proc.wait()


def with_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_sigkill_of_the_agent_leaves_no_orphan(tmp_path: Path) -> None:
    async with owner(tmp_path) as (agent_pid, info):
        everything = [info["pid"], info["child"], info["fence"]]
        assert all(alive(pid) for pid in everything)
        os.kill(agent_pid, signal.SIGKILL)
        await eventually(
            lambda: not any(alive(pid) for pid in everything),
            timeout=15,
            what="workload, its child and the fence to go with the agent",
        )


async def test_paused_agent_cannot_keep_the_workload_past_its_deadline(tmp_path: Path) -> None:
    async with owner(tmp_path, deadline_in=1.0) as (agent_pid, info):
        deadline = float(info["deadline"])
        pids = [info["pid"], info["child"]]
        os.kill(agent_pid, signal.SIGSTOP)
        assert boottime() < deadline, "the owner was too slow to start; cannot measure"
        await eventually(
            lambda: not any(alive(pid) for pid in pids),
            timeout=10,
            interval=0.005,
            what="workload and its child to be killed at the deadline",
        )
        lateness = boottime() - deadline
        assert _state(agent_pid) == "T", "the agent was not paused, so it proves nothing"
        # The margin (ttl/10, at least 50 ms) is what absorbs this lateness: a safety bound.
        assert lateness <= 0.2, f"killed {lateness * 1000:.0f} ms after the deadline"
        assert lateness >= 0, f"killed {-lateness * 1000:.0f} ms before the deadline"


async def test_a_killed_fence_takes_the_whole_group_with_it(tmp_path: Path) -> None:
    async with owner(tmp_path) as (_agent, info):
        os.kill(info["fence"], signal.SIGKILL)
        await eventually(
            lambda: not alive(info["pid"]) and not alive(info["child"]),
            timeout=10,
            what="the workload (PR_SET_PDEATHSIG) and its child (the agent's killpg)",
        )


async def test_a_full_disk_kills_neither_the_fence_nor_its_deadline(tmp_path: Path) -> None:
    """Issue 9 item 10: workload logs fill the state directory (a 256 kB tmpfs). The fence
    writes no log itself; rotation fails quietly; it keeps enforcing the deadline, and the
    whole group dies at it."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        import pytest

        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]
    await asyncio.to_thread(subprocess.run, mount, check=True)
    try:
        from scores.base import Deadline, RunContext
        from scores.process import ProcessSpec
        from topologies.localhost import LocalhostTopology

        topology = LocalhostTopology()
        task = asyncio.create_task(topology.fence.run())
        await asyncio.wait_for(topology.fence.started.wait(), 15)
        child = small / "child.pid"
        script = f"sleep 60 & echo $! > {child}; while true; do echo filling the disk; done"
        spec = ProcessSpec(command=["sh", "-c", script], log_max_bytes=4096, log_backups=2)
        interpret = spec.interpret(topology)
        deadline = boottime() + 3.0
        ctx = RunContext("full", "site-a", "n1", 1, small, Deadline(deadline))
        assert (await interpret.apply(ctx)).ok
        grandchild = int(await eventually(lambda: child.exists() and child.read_text().strip()))
        usage = await eventually(
            lambda: shutil.disk_usage(small).free < 8192, timeout=10, what="the disk to fill"
        )
        assert usage
        assert topology.fence.proc is not None and topology.fence.proc.returncode is None
        fence = topology.fence.proc

        async def dead_at_deadline() -> bool:
            assert fence.returncode is None, f"the fence died of the full disk ({fence.returncode})"
            return await _dead_at_deadline(interpret)

        seen = await eventually(dead_at_deadline, timeout=10, what="killed at the deadline")
        assert seen and boottime() >= deadline
        assert not alive(grandchild), "a grandchild outlived the deadline on a full disk"
        assert topology.fence.proc.returncode is None, "the fence died of the full disk"
        await topology.fence.close()
        task.cancel()
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(small)], check=False)


async def _dead_at_deadline(interpret: Any) -> bool:
    seen = await interpret.observe()
    return bool(seen.reason == "deadline")


AHEAD = 1000.0
"""CLOCK_BOOTTIME minus CLOCK_MONOTONIC in the time namespaces below: what a machine shows
after being suspended that long (CLOCK_MONOTONIC stops during suspend, BOOTTIME does not)."""


def _time_namespaces() -> bool:
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--time", "--boottime", "1", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


async def test_deadlines_are_kept_on_boottime_when_it_runs_ahead_of_monotonic(
    tmp_path: Path,
) -> None:
    """Issue 9 item 11: the agent's deadlines (session, leases, runner) and the fence's
    checks are on CLOCK_BOOTTIME. On this machine the two clocks agree (it was never
    suspended), so a component on CLOCK_MONOTONIC would pass every other test; in a time
    namespace where BOOTTIME runs ``AHEAD`` of MONOTONIC, a mix of the two clocks shows:
    an agent on MONOTONIC hands the fence a deadline long past (nothing starts), a fence on
    MONOTONIC sees a deadline far away (nothing is killed)."""
    import pytest

    if not _time_namespaces():
        pytest.skip("needs root and unshare --time (Linux >= 5.6)")
    wrap = ("unshare", "--time", "--boottime", str(int(AHEAD)))
    async with owner(tmp_path, deadline_in=1.0, wrap=wrap) as (_agent, info):
        deadline = float(info["deadline"]) - AHEAD  # on this namespace's CLOCK_BOOTTIME
        pids = [info["pid"], info["child"]]
        await eventually(
            lambda: not any(alive(pid) for pid in pids),
            timeout=10,
            interval=0.005,
            what="workload and its child to be killed at the deadline",
        )
        # Measured on the kernel's clock, not mesh.clock: that is one of the clocks under test.
        lateness = time.clock_gettime(time.CLOCK_BOOTTIME) - deadline
        assert -0.05 <= lateness <= 0.5, f"killed {lateness:.3f} s after the deadline"


SUSPENDED = """
import asyncio, ctypes, json, os, sys
from pathlib import Path
import uvloop
from mesh.clock import boottime
from scores.base import Deadline, RunContext
from scores.process import ProcessSpec
from topologies.localhost import LocalhostTopology

CLONE_NEWTIME = 0x80

async def main() -> None:
    # Children (the fence) start in a time namespace whose CLOCK_BOOTTIME is ahead by
    # argv[2] seconds and whose CLOCK_MONOTONIC is ours: as if the machine had been
    # suspended that long between our deadline and the fence's check.
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWTIME) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWTIME)")
    Path("/proc/self/timens_offsets").write_text(f"boottime {int(sys.argv[2])} 0\\n")
    topology = LocalhostTopology()
    asyncio.create_task(topology.fence.run())
    await topology.fence.started.wait()
    spec = ProcessSpec(command=["sleep", "60"], stop_timeout=1)
    interpret = spec.interpret(topology)
    ctx = RunContext("resumed", "site-a", "node-1", 1, Path(sys.argv[1]), Deadline(boottime() + 5))
    outcome = await interpret.apply(ctx)
    seen = await interpret.observe()
    print(json.dumps({"ok": outcome.ok, "detail": outcome.message, "pids": list(seen.pids)}),
          flush=True)
    await topology.fence.close()

uvloop.run(main())
"""


async def test_a_fence_resumed_past_the_deadline_starts_nothing(tmp_path: Path) -> None:
    """Issue 9 item 11, the other half: the fence's own clock. Its children see CLOCK_BOOTTIME
    ``AHEAD`` of ours and the same CLOCK_MONOTONIC, as after a suspend between the agent
    computing a deadline 5 s ahead and the fence checking it: the fence must find it passed
    and refuse the start. A fence on CLOCK_MONOTONIC (even with the agent on it too) would
    start the workload as if no time had passed."""
    import pytest

    if not _time_namespaces():
        pytest.skip("needs root and unshare --time (Linux >= 5.6)")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUSPENDED,
        str(tmp_path),
        str(int(AHEAD)),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = b""
    while not line.startswith(b"{"):
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, "the owner exited before reporting"
    await asyncio.wait_for(proc.wait(), 30)
    info = json.loads(line)
    assert not info["ok"] and not info["pids"], f"started after its deadline passed: {info}"
    assert "deadline already passed" in info["detail"], info
