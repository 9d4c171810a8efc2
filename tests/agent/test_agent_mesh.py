"""Agents on a real 3-node JetStream cluster: sessions, live status, node loss, shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from mesh.names import STATE_BUCKET, agent_key, session_key, status_subject, store_bucket
from mesh.records import SessionRecord, parse_session
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
def agents(tmp_path: Path, nats_cluster: NatsCluster) -> Iterator[list[AgentProcess]]:
    procs = [
        AgentProcess(
            site=f"site-{s}",
            node="n1",
            workdir=tmp_path / f"agent-{s}",
            servers=[nats_cluster.urls[i], *nats_cluster.urls[:i], *nats_cluster.urls[i + 1 :]],
            ttl=f"{TTL}s",
            extra={"mesh": {"stores": nats_cluster.stores}},
        )
        for i, s in enumerate("abc")
    ]
    for p in procs:
        p.start()
    yield procs
    for p in procs:
        p.kill()


async def session(nc: Client, store: str, agent: AgentProcess) -> tuple[int, SessionRecord]:
    """The agent's session record in one store: (sequence, record)."""
    kv = await nc.jetstream(timeout=3).key_value(store_bucket(store))
    entry = await kv.get(session_key(agent.site, agent.node))
    rec = parse_session(entry.value)
    assert rec is not None, entry.value
    return entry.revision or 0, rec


async def renewing(nc: Client, store: str, agent: AgentProcess) -> bool:
    """The session record in ``store`` moves on (renewed every ttl/3)."""
    seq, rec = await session(nc, store, agent)
    assert rec.state.value == "alive"

    async def moved() -> bool:
        return (await session(nc, store, agent))[0] > seq

    await eventually(moved, timeout=3 * TTL, what=f"{agent.agent_id} renews in {store}")
    return True


async def test_sessions_renew_in_every_store_and_status_answers(
    client: Client, nats_cluster: NatsCluster, agents: list[AgentProcess]
) -> None:
    for agent in agents:
        await eventually(agent.ready, timeout=30, what=f"{agent.agent_id} ready")
    for agent in agents:
        for store in nats_cluster.stores:
            assert await renewing(client, store, agent)
        reply = await client.request(status_subject(agent.site, agent.node), b"", timeout=3)
        status = json.loads(reply.data)
        assert status["ok"] is True and status["id"] == agent.agent_id
        assert status["health"]["in_quorum"] is True
        assert set(status["session"]["stores"]) == set(nats_cluster.stores)
        assert all(s["live"] for s in status["session"]["stores"].values())
        assert "session" in status["tasks"] and "leases" in status["tasks"]
        assert "password" not in reply.data.decode().lower()


async def test_a_dead_node_takes_one_store_and_no_session(
    client: Client, nats_cluster: NatsCluster, agents: list[AgentProcess]
) -> None:
    for agent in agents:
        await eventually(agent.ready, timeout=30, what=f"{agent.agent_id} ready")
    # site-a's agent prefers node 0 and its store lives there; kill it.
    nats_cluster.nodes[0].kill()
    await client.close()
    nc = await nats.connect(servers=nats_cluster.urls[1:])
    try:
        for agent in agents:
            for store in nats_cluster.stores[1:]:
                assert await renewing(nc, store, agent)

        def ready() -> dict[str, Any] | None:  # (code, body) would always be truthy
            code, body = agents[0].http("/readyz")
            return body if code == 200 else None

        status = await eventually(ready, timeout=30, what="site-a ready with node 0 dead")
        assert status["in_quorum"] is True, status
        for agent in agents:
            assert agent.running() and "session lost" not in agent.log(1_000_000)
    finally:
        await nc.close()


async def test_sigterm_shuts_down_cleanly_and_closes_the_session_everywhere(
    client: Client, nats_cluster: NatsCluster, agents: list[AgentProcess]
) -> None:
    agent = agents[0]
    await eventually(agent.ready, timeout=30, what="ready")

    async def started() -> bool:  # every task up: a SIGTERM now is a shutdown, not an abort
        reply = await client.request(status_subject(agent.site, agent.node), b"", timeout=3)
        return "control-loop" in json.loads(reply.data)["tasks"]

    await eventually(started, timeout=30, what="start-up complete")
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    code = await asyncio.wait_for(asyncio.to_thread(agent.proc.wait), 4 * TTL)
    assert code == 0, agent.log()
    for store in nats_cluster.stores:
        _, rec = await session(client, store, agent)
        assert rec.state.value == "closed", f"{store}: {rec}"
    kv = await client.jetstream().key_value(STATE_BUCKET)
    summary = json.loads((await kv.get(agent_key(agent.site, agent.node))).value or b"{}")
    assert summary["state"] == "closed"
