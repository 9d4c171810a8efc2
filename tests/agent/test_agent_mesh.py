"""Agents on a real 3-node JetStream cluster: heartbeats, live status, node loss, shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from mesh.names import STATE_BUCKET, agent_key, status_subject
from mesh.session import decode
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually

TTL = 3.0


@pytest.fixture
async def client(nats_cluster: NatsCluster) -> AsyncIterator[Client]:
    nc = await nats.connect(servers=nats_cluster.urls)
    yield nc
    await nc.close()


@pytest.fixture
def agents(tmp_path: Path, nats_cluster: NatsCluster) -> list[AgentProcess]:
    procs = [
        AgentProcess(
            site=f"site-{s}",
            node="n1",
            workdir=tmp_path / f"agent-{s}",
            servers=[nats_cluster.urls[i], *nats_cluster.urls[:i], *nats_cluster.urls[i + 1 :]],
            ttl=f"{TTL}s",
        )
        for i, s in enumerate("abc")
    ]
    for p in procs:
        p.start()
    yield procs  # type: ignore[misc]
    for p in procs:
        p.kill()


async def _heartbeat(nc: Client, agent: AgentProcess) -> tuple[int, dict[str, object]] | None:
    kv = await nc.jetstream().key_value(STATE_BUCKET)
    entry = await kv.get(agent_key(agent.site, agent.node))
    view = decode(entry.value, entry.revision or 0)
    return (view.revision, view.data) if view else None


async def test_heartbeats_visible_and_status_answers(
    client: Client, agents: list[AgentProcess]
) -> None:
    for agent in agents:
        await eventually(agent.ready, timeout=30, what=f"{agent.agent_id} ready")
    for agent in agents:
        first = await _heartbeat(client, agent)
        assert first is not None
        rev, data = first
        assert data["state"] == "alive" and data["agent"] == agent.agent_id
        assert data["version"] and data["started_at"]
        # Fresh: the revision moves on (renewed every ttl/3).
        await eventually(
            lambda a=agent, r=rev: _moved(client, a, r), timeout=3 * TTL, what="heartbeat renewal"
        )
        reply = await client.request(status_subject(agent.site, agent.node), b"", timeout=3)
        status = json.loads(reply.data)
        assert status["ok"] is True
        assert status["id"] == agent.agent_id
        assert status["health"]["in_quorum"] is True
        assert "session" in status["tasks"]


async def _moved(nc: Client, agent: AgentProcess, rev: int) -> bool:
    beat = await _heartbeat(nc, agent)
    return beat is not None and beat[0] > rev


async def test_node_killed_agents_reconnect_and_heartbeats_continue(
    client: Client, nats_cluster: NatsCluster, agents: list[AgentProcess]
) -> None:
    for agent in agents:
        await eventually(agent.ready, timeout=30, what=f"{agent.agent_id} ready")
    # site-a's agent prefers node 0; kill it.
    nats_cluster.nodes[0].kill()
    await client.close()
    nc = await nats.connect(servers=nats_cluster.urls[1:])
    try:
        for agent in agents:
            beat = await eventually(
                lambda a=agent: _heartbeat(nc, a), timeout=30, what="heartbeat after node loss"
            )
            await eventually(
                lambda a=agent, r=beat[0]: _moved(nc, a, r),
                timeout=30,
                what=f"{agent.agent_id} heartbeats continue",
            )
        status = await eventually(lambda: agents[0].http("/readyz"), timeout=30)
        assert status[0] == 200, agents[0].log()
        assert agents[0].running()
    finally:
        await nc.close()


async def test_sigterm_shuts_down_cleanly_and_closes_session(
    client: Client, agents: list[AgentProcess]
) -> None:
    agent = agents[0]
    await eventually(agent.ready, timeout=30, what="ready")

    async def started() -> bool:  # every task up: a SIGTERM now is a shutdown, not an abort
        reply = await client.request(status_subject(agent.site, agent.node), b"", timeout=3)
        return "control-loop" in json.loads(reply.data)["tasks"]

    await eventually(started, timeout=30, what="start-up complete")
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    code = await asyncio.wait_for(asyncio.to_thread(agent.proc.wait), 2 * TTL)
    assert code == 0, agent.log()
    beat = await _heartbeat(client, agent)
    assert beat is not None and beat[1]["state"] == "closed"
