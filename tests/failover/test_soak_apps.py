"""Soak: hundreds of AbsoluteConsistency applications started, failed over and checked
over their whole history (issue 17). Only in ``make soak`` (``HARMONY_SOAK=1``).

Three sites on loopback (one nats-server and one agent each, one lease store per site),
``HARMONY_SOAK_APPS`` (300) Process applications ``sleep 100001.<i>`` placed on all three
sites, applied at once with ``harmony-agent apply -f``. Every workload's life comes from
the kernel (``tests/harness/procevents.py``: exec and exit events), so "never two at once"
is checked over every instant, not sampled. Then:

1. the agent running the most applications is killed (SIGKILL): its fence stops its
   workloads, the others take them over;
2. the agent running the most applications now is paused (SIGSTOP): its fence kills its
   workloads at the lease deadline, the others take them over after it; then it resumes
   and must not start any of them again.

After each step every application runs exactly once, and no two instances of any
application ever overlapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.harness import history
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.ports import free_port
from tests.harness.procevents import ProcHistory, available
from tests.harness.wait import eventually

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("HARMONY_SOAK") != "1", reason="only in make soak"),
    pytest.mark.skipif(not available(), reason="needs root and the proc connector"),
    pytest.mark.timeout(900),
]

SITES = ("site-a", "site-b", "site-c")
APPS = int(os.environ.get("HARMONY_SOAK_APPS", "300"))
TTL = 2.0


def manifest(n: int) -> str:
    return yaml.safe_dump_all(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": f"soak-{i:04d}"},
            "spec": {
                "trait": "stateful",
                "placement": {"sites": [SITES[(i + k) % 3] for k in range(3)]},
                "score": {
                    "kind": "Process",
                    "command": ["sleep", f"100001.{i}"],
                    "stop_timeout": "1s",
                },
            },
        }
        for i in range(n)
    )


class Mesh:
    def __init__(self, workdir: Path) -> None:
        ports = [free_port() for _ in SITES]
        self.nodes = [
            NatsNode(
                name=f"n-{site}",
                workdir=workdir / site / "nats",
                cluster_port=ports[i],
                routes=tuple(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(ports) if j != i),
                tags=(f"site:{site}",),
            )
            for i, site in enumerate(SITES)
        ]
        self.agents = [
            AgentProcess(
                site=site,
                node="n1",
                workdir=workdir / site / "agent",
                servers=[self.nodes[i].url],
                ttl=f"{TTL:g}s",
                extra={"mesh": {"stores": list(SITES)}, "log": {"level": "info"}},
            )
            for i, site in enumerate(SITES)
        ]
        self.procs = ProcHistory(rb"sleep\x00100001\.(\d+)\x00")

    def fence_children(self, agent: AgentProcess) -> set[int]:
        """The workloads an agent's fence runs now."""
        assert agent.proc is not None
        out: set[int] = set()
        for child in _children(agent.proc.pid):
            with contextlib.suppress(OSError):
                if b"fence.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                    out |= set(_children(child))
        return out

    def busiest(self, among: list[AgentProcess]) -> AgentProcess:
        return max(among, key=lambda a: len(self.fence_children(a)))

    def all_once(self, replaced: frozenset[int] | set[int] = frozenset()) -> bool:
        running = self.procs.running()
        return (
            len(running) == APPS
            and all(len(p) == 1 for p in running.values())
            and not any(set(p) & replaced for p in running.values())
        )

    def check(self) -> None:
        overlaps = history.overlaps(self.procs.instances())
        assert not overlaps, "\n".join(str(o) for o in overlaps[:10])
        assert self.procs.dropped == 0, "the kernel dropped process events: history incomplete"


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(tmp_path)
    m.procs.start()
    try:
        for node in m.nodes:
            node.start()
        await asyncio.gather(*(n.wait_ready(30) for n in m.nodes))
        for agent in m.agents:
            agent.start()
        for agent in m.agents:
            await eventually(agent.ready, timeout=90, what=f"{agent.agent_id} ready")
        yield m
    finally:
        for agent in m.agents:
            if agent.running():
                agent.signal(signal.SIGCONT)
                agent.kill()  # their fences stop every workload
        with contextlib.suppress(AssertionError):
            await eventually(lambda: not m.procs.running(), timeout=30, what="workloads gone")
        for pids in m.procs.running().values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for node in m.nodes:
            node.stop()
        m.procs.stop()


async def test_hundreds_of_applications_fail_over_without_ever_running_twice(
    mesh: Mesh, tmp_path: Path
) -> None:
    path = tmp_path / "apps.yaml"
    path.write_text(manifest(APPS))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent.cli", "apply", "-f", str(path), "-s", mesh.nodes[0].url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    await eventually(mesh.all_once, timeout=180, interval=0.2, what=f"{APPS} running once")
    mesh.check()

    # 1. The busiest agent dies.
    victim = mesh.busiest(mesh.agents)
    replaced = mesh.fence_children(victim)
    assert replaced, "the busiest agent runs nothing"
    victim.kill()
    await eventually(
        lambda: mesh.all_once(replaced), timeout=60, interval=0.2, what="taken over after a kill"
    )
    mesh.check()

    # 2. The busiest survivor is paused: its fence kills at the deadline, others take over.
    survivors = [a for a in mesh.agents if a is not victim]
    paused = mesh.busiest(survivors)
    replaced = mesh.fence_children(paused)
    paused.signal(signal.SIGSTOP)
    try:
        await eventually(
            lambda: mesh.all_once(replaced), timeout=60, interval=0.2, what="taken over in a pause"
        )
        mesh.check()
    finally:
        paused.signal(signal.SIGCONT)
    # Resumed: it lost every lease while paused and must start none of them again.
    await eventually(paused.ready, timeout=60, what="the paused agent back")
    await asyncio.sleep(2 * TTL)  # not a synchronisation: the time a wrong restart would take
    assert mesh.all_once(), "an application is not running exactly once after the resume"
    mesh.check()
