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


async def test_a_taken_port_stops_the_server_before_it_starts(tmp_path: Path) -> None:
    """Issue 15 item 4, inside the agent (``run`` also checks before starting): the
    embedded server refuses to start on a port someone else holds, and ``wait_started``
    says so, instead of the agent joining whatever listens there."""
    import asyncio
    import socket

    from mesh.embedded import EmbeddedServer, PortInUse, ServerSpec

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        spec = ServerSpec(
            name="t", store_dir=tmp_path / "js", listen=f"127.0.0.1:{port}", monitor_listen=None
        )
        server = EmbeddedServer(spec, tmp_path / "nats.conf")
        runner = asyncio.create_task(server.run())
        with pytest.raises(PortInUse, match=f"client port 127.0.0.1:{port}: cannot listen"):
            await server.wait_started()
        with pytest.raises(PortInUse):
            await runner
        assert server.process is None
