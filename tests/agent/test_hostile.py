"""Issue 9 items 5 and 7: hostile values in the mesh crash nothing and stop nothing, and a
fenced application is never started for a moment at boot.

Real agents on a real 3-node cluster; the hostile writes are made the way any client with
write access could make them (deep nesting well under the size limit, non-objects, bytes
that are not UTF-8).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from mesh.names import STATE_BUCKET, instance_key, lease_claim_key, store_bucket
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually
from tests.mesh.lease_world import make_mesh

TTL = 2.0
NESTED = b"[" * 30_000 + b"]" * 30_000  # 60 kB: RecursionError for json.loads
FILLER = 20_000
"""Instance reports between an Application and its fence mark in the boot snapshot."""
HOSTILE = [NESTED, b"\xff\xfe not utf-8", b"null", b"[1, 2]", b'{"epoch": {"a": 1}}']


def app_doc(name: str, marker: Path) -> bytes:
    return json.dumps(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": name},
            "spec": {
                "trait": "stateful",
                "placement": {"sites": ["site-a", "site-b", "site-c"]},
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
            servers=[nats_cluster.urls[i]],
            ttl=f"{TTL}s",
            extra={"mesh": {"stores": nats_cluster.stores}},
        )
        for i, s in enumerate("abc")
    ]
    yield procs
    for p in procs:
        p.kill()


def metric(agent: AgentProcess, name: str) -> float:
    import urllib.request

    url = f"http://{agent.health_host}:{agent.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def pids(marker: Path) -> list[int]:
    return [int(p) for p in marker.read_text().split()] if marker.exists() else []


async def test_hostile_values_everywhere_crash_nothing_and_stop_nothing(
    client: Client, nats_cluster: NatsCluster, agents: list[AgentProcess], tmp_path: Path
) -> None:
    for agent in agents:
        agent.start()
    for agent in agents:
        await eventually(agent.ready, timeout=60, what=f"{agent.agent_id} ready")
    js = client.jetstream(timeout=5)
    state = await js.key_value(STATE_BUCKET)
    marker = tmp_path / "ledger.pids"
    await state.put("app.ledger", app_doc("ledger", marker))
    first = await eventually(lambda: pids(marker), timeout=30, what="ledger running")

    from nats.js.errors import BadRequestError

    with pytest.raises(BadRequestError, match="size exceeds"):  # buckets cap values at 64 KiB
        await state.put("app.big", b"x" * 70_000)
    for n, value in enumerate(HOSTILE):
        await state.put("app.ledger", value)  # the last good spec must stay in force
        await state.put(f"app.evil{n}", value)
        await state.put(instance_key("ledger", "site-x", f"n{n}"), value)
        await state.put(f"agent.site-x.n{n}", value)
        await state.put(f"fence.other{n}", value)
        await state.put(f"drain.site-x{n}", value)
        for store in nats_cluster.stores:
            kv = await js.key_value(store_bucket(store))
            await kv.put(f"sess.site-x.n{n}.live", value)
            await kv.put(f"lease.ledger.site-x.n{n}", value)
            await kv.put(f"lease.evil{n}.site-x.n{n}", value)
        await client.publish("harmony.instances.site-x.n0", value)
    await client.flush()

    async def noticed() -> bool:
        counts = [await asyncio.to_thread(metric, a, "harmony_rejected_values") for a in agents]
        return all(c > 0 for c in counts)

    await eventually(noticed, timeout=20, what="every agent to count the rejected values")
    # Three more ttls: every agent still up and healthy, the workload never restarted.
    until = asyncio.get_running_loop().time() + 3 * TTL
    while asyncio.get_running_loop().time() < until:
        for agent in agents:
            assert agent.running(), agent.log()
        await asyncio.sleep(0.2)
    for agent in agents:
        code, _ = await asyncio.to_thread(agent.http, "/healthz")
        assert code == 200, agent.log()
    assert pids(marker) == first, "a hostile value restarted the workload"
    logs = "".join(a.log(3_000_000) for a in agents)
    assert "rejected a value read from the mesh" in logs
    assert "Traceback" not in logs
    # A decoder that raises is caught by the watch (or by nats-py for a subscription) and
    # the agent lives on: only these lines show that the decoder itself let it escape.
    assert "watch_callback_failed" not in logs, "a decoder raised into a KV watch"
    assert "mesh_client_error" not in logs, "a decoder raised into a subscription callback"


async def test_a_fenced_application_never_starts_at_boot(
    client: Client, nats_cluster: NatsCluster, agents: list[AgentProcess], tmp_path: Path
) -> None:
    """Marks and Applications are loaded before any lease is wanted: an application fenced
    before the agents start is never run, not even for the moment before the mark is seen.

    The fence is written after the Application, behind thousands of instance reports, so
    the boot snapshot delivers the Application long before the mark. A controller that
    made runners as Applications arrive (not once the whole snapshot is in) contends for
    the lease before it sees the fence; the workload itself rarely gets as far as starting
    (the agent's loop is busy with the snapshot, and the fence arrives before the start),
    so the test checks what it would start from: no claim on ``ledger`` in any lease store.
    With the fence written first and only the marker checked, that bug could not fail it.
    """
    js = client.jetstream(timeout=10)

    await make_mesh(nats_cluster.urls, nats_cluster.stores)  # waits out the meta election
    state = await js.key_value(STATE_BUCKET)
    marker = tmp_path / "fenced.pids"
    await state.put("app.ledger", app_doc("ledger", marker))
    for i in range(FILLER):  # core publishes into the stream: fast, and ordered before the mark
        await client.publish(f"$KV.{STATE_BUCKET}.inst.filler.site-x.n{i}", b"{}")
    await client.flush()
    await state.put("fence.ledger", b'{"kind": "fence", "app": "ledger", "by": "test"}')
    for agent in agents:
        agent.start()
    reports: dict[str, Any] = {}

    async def all_fenced() -> bool:
        for agent in agents:
            try:
                entry = await state.get(instance_key("ledger", agent.site, agent.node))
            except Exception:
                return False
            reports[agent.site] = json.loads(entry.value or b"{}")
        return all(r.get("state") == "fenced" for r in reports.values())

    await eventually(all_fenced, timeout=60, what="every agent to report ledger fenced")
    assert pids(marker) == [], "a fenced application ran at boot"
    for store in nats_cluster.stores:
        kv = await js.key_value(store_bucket(store))
        for agent in agents:
            with contextlib.suppress(KeyNotFoundError):
                entry = await kv.get(lease_claim_key("ledger", agent.site, agent.node))
                raise AssertionError(
                    f"{agent.agent_id} contended for fenced ledger: {entry.value!r}"
                )
