"""The embedded mesh node: restarted when it crashes, never orphaned when the agent dies."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.agents import AgentProcess
from tests.harness.ports import free_port
from tests.harness.wait import eventually


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    """Running and not a zombie (a container's pid 1 may never reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def nats_child(agent: AgentProcess) -> int | None:
    assert agent.proc is not None
    for pid in children(agent.proc.pid):
        try:
            if "nats-server" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
        except OSError:
            continue
    return None


@pytest.fixture
def embedded_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    port = free_port()
    agent = AgentProcess(
        site="edge",
        node="n1",
        workdir=tmp_path / "agent",
        servers=[f"nats://127.0.0.1:{port}"],
        ttl="1s",
        extra={
            "nats": {
                "embedded": True,
                "listen": f"127.0.0.1:{port}",
                "monitor_listen": f"127.0.0.1:{free_port()}",
            },
            "mesh": {"replicas": 1},
        },
    )
    agent.start()
    yield agent
    agent.kill()
    pid = nats_child(agent)
    if pid:
        os.kill(pid, signal.SIGKILL)


async def test_kill_9_of_agent_leaves_no_nats_server(embedded_agent: AgentProcess) -> None:
    await eventually(embedded_agent.ready, timeout=30, what="embedded agent ready")
    child = nats_child(embedded_agent)
    assert child is not None and alive(child)
    embedded_agent.kill()
    await eventually(lambda: not alive(child), timeout=5, what="nats-server to die with agent")


async def test_crashed_nats_server_is_restarted(embedded_agent: AgentProcess) -> None:
    await eventually(embedded_agent.ready, timeout=30, what="embedded agent ready")
    first = nats_child(embedded_agent)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    second = await eventually(
        lambda: pid if (pid := nats_child(embedded_agent)) not in (None, first) else None,
        timeout=15,
        what="a new nats-server child",
    )
    assert alive(second)
    await eventually(embedded_agent.ready, timeout=30, what="ready again after restart")
    assert embedded_agent.running()


async def test_state_files_are_private(embedded_agent: AgentProcess) -> None:
    await eventually(embedded_agent.ready, timeout=30, what="embedded agent ready")
    state = embedded_agent.workdir / "state"
    assert state.stat().st_mode & 0o077 == 0
    conf = state / "nats" / "nats-server.conf"
    assert conf.stat().st_mode & 0o077 == 0
    assert "sync_interval: always" in conf.read_text()
