"""Issue 17: renewals never depend on the agent's main loop being free.

A start storm (dozens of workloads spawned at once) keeps the agent's event loop busy for
longer than the lease ttl; when renewals ran on that loop, the session lapsed, every lease
was lost and every workload stopped, and the storm began again. Here a real agent (in this
process, so its loop can be made busy) on a real 3-node cluster holds an application at
ttl 2 s, and its main loop is blocked for 1.5 ttl, as a storm would block it. The session
must stay valid throughout (sampled from another thread), and the workload keep running.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from agent.daemon import Agent
from mesh.clock import boottime
from mesh.names import STATE_BUCKET
from tests.agent.conftest import in_process_agent
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually

TTL = 2.0
BUSY = 1.5 * TTL
"""Longer than the ttl, shorter than the session's stall limit (max(2 x ttl, 5 s))."""


def app_doc(marker: Path) -> bytes:
    return json.dumps(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": "ledger"},
            "spec": {
                "trait": "stateful",
                "failover": {"strategy": "AbsoluteConsistency"},
                "placement": {"sites": ["site-a"]},
                "score": {
                    "kind": "Process",
                    "command": [
                        sys.executable,
                        "-c",
                        f"import os, time; open({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n');"
                        " time.sleep(3600)",
                    ],
                    "stop_timeout": "1s",
                },
            },
        }
    ).encode()


def pids(marker: Path) -> list[int]:
    return [int(p) for p in marker.read_text().split()] if marker.exists() else []


@pytest.fixture
async def client(mesh_client: Client) -> Client:
    return mesh_client


@pytest.fixture
async def agent(tmp_path: Path, nats_cluster: NatsCluster) -> AsyncIterator[Agent]:
    agent = in_process_agent(tmp_path / "agent", nats_cluster, TTL)
    task = asyncio.create_task(agent.run(), name="agent-under-test")
    try:
        await eventually(lambda: agent.started or task.done(), timeout=30, what="agent started")
        assert not task.done(), "the agent did not start"
        yield agent
    finally:
        agent.stop_event.set()
        await asyncio.wait_for(task, timeout=60)


async def test_a_busy_main_loop_loses_no_session_and_no_lease(
    agent: Agent, client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "ledger.pids"
    kv = await client.jetstream(timeout=5).key_value(STATE_BUCKET)
    await kv.put("app.ledger", app_doc(marker))
    first = await eventually(lambda: pids(marker), timeout=30, what="ledger running")
    assert agent.leases is not None and agent.session is not None
    token = agent.leases.held()["ledger"]
    session = agent.session

    lapses: list[float] = []
    sampling = threading.Event()

    def sample() -> None:  # another thread: it sees the session while the loop cannot
        while not sampling.is_set():
            if not session.view().valid(boottime()):
                lapses.append(boottime())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, name="validity-sampler")
    sampler.start()
    try:
        time.sleep(BUSY)  # noqa: ASYNC251 - the point: the main loop is busy, as in a storm
        await eventually(  # the loop runs again: a few control cycles, then look
            lambda: agent.last_cycle is not None and time.monotonic() - agent.last_cycle < 0.1,
            timeout=5,
            what="the main loop cycling again",
        )
    finally:
        sampling.set()
        sampler.join()
    assert lapses == [], f"the session was not valid for {len(lapses)} samples of 20 ms"
    assert agent.leases.held().get("ledger") == token, "the lease was lost"
    assert pids(marker) == first, "the workload was restarted"
