"""Process workloads never outlive their agent, nor their deadline while the agent is paused.

The "agent" here is a real separate Python process under uvloop (as the daemon runs), so it
can be SIGKILLed or SIGSTOPped without taking the test down.
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

from tests.harness.wait import eventually
from tests.scores.conftest import alive

OWNER = """
import asyncio, json, sys, time
from pathlib import Path
import uvloop
from scores.base import RunContext
from scores.process import ProcessSpec
from topologies.localhost import LocalhostTopology

async def main() -> None:
    lead = float(sys.argv[2])
    deadline = time.monotonic() + lead if lead > 0 else None
    spec = ProcessSpec(command=["sh", "-c", "sleep 60 & sleep 60; wait"])
    interpret = spec.interpret(LocalhostTopology())
    ctx = RunContext("owned", "site-a", "node-1", 1, Path(sys.argv[1]), deadline)
    outcome = await interpret.apply(ctx)
    seen = await interpret.observe()
    give_up = time.monotonic() + 10
    while len(seen.pids) < 2 and time.monotonic() < give_up:  # the shell forks its child
        await asyncio.sleep(0.01)
        seen = await interpret.observe()
    print(json.dumps({"ok": outcome.ok, "pids": seen.pids, "guard": seen.extra["guard_pid"],
                      "deadline": deadline}), flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""


@asynccontextmanager
async def owner(state: Path, deadline_in: float = 0.0) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OWNER, str(state), str(deadline_in), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        info = json.loads(line)
        assert info["ok"], info
        yield proc.pid, info
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_sigkill_of_the_agent_leaves_no_orphan(tmp_path: Path) -> None:
    async with owner(tmp_path) as (agent_pid, info):
        workload = [*info["pids"], info["guard"]]
        assert len(info["pids"]) >= 2, "expected the shell and its background child"
        assert all(alive(pid) for pid in workload)
        os.kill(agent_pid, signal.SIGKILL)
        await eventually(
            lambda: not any(alive(pid) for pid in workload),
            timeout=15,
            what="workload, its child and its guard to die with the agent",
        )


async def test_paused_agent_cannot_keep_the_workload_past_its_deadline(tmp_path: Path) -> None:
    async with owner(tmp_path, deadline_in=1.0) as (agent_pid, info):
        deadline = float(info["deadline"])
        pids = info["pids"]
        os.kill(agent_pid, signal.SIGSTOP)
        assert time.monotonic() < deadline, "the owner was too slow to start; cannot measure"
        await eventually(
            lambda: not any(alive(pid) for pid in pids),
            timeout=10,
            interval=0.005,
            what="workload to be killed at the deadline",
        )
        lateness = time.monotonic() - deadline
        assert _state(agent_pid) == "T", "the agent was not paused, so it proves nothing"
        assert lateness <= 0.2, f"killed {lateness * 1000:.0f} ms after the deadline"
        assert lateness >= 0, f"killed {-lateness * 1000:.0f} ms before the deadline"
        log = (tmp_path / "workloads" / "owned.log").read_text()
        assert "deadline passed: SIGKILL" in log
