"""Bootstrap is idempotent: concurrent agents, restarts, and replica capping."""

from __future__ import annotations

import asyncio

import nats

from mesh.bootstrap import ensure_mesh
from mesh.names import EVENTS_STREAM, LEASES_BUCKET, STATE_BUCKET, TRUST_BUCKET
from tests.harness.nats import NatsCluster, NatsNode


async def test_two_agents_bootstrap_at_once_on_cluster(nats_cluster: NatsCluster) -> None:
    a = await nats.connect(servers=[nats_cluster.urls[0]])
    b = await nats.connect(servers=[nats_cluster.urls[1]])
    try:
        ba, bb = await asyncio.gather(
            ensure_mesh(a.jetstream(timeout=15), 3), ensure_mesh(b.jetstream(timeout=15), 3)
        )
        assert ba.replicas == bb.replicas == 3
        await ba.state.put("agent.x.y", b"1")
        assert (await bb.state.get("agent.x.y")).value == b"1"
        js = a.jetstream()
        for stream in (f"KV_{STATE_BUCKET}", f"KV_{LEASES_BUCKET}", f"KV_{TRUST_BUCKET}"):
            assert (await js.stream_info(stream)).config.num_replicas == 3
        assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 3
    finally:
        await a.close()
        await b.close()


async def test_replicas_capped_on_single_node_and_restart_keeps_data(nats_server: NatsNode) -> None:
    nc = await nats.connect(servers=[nats_server.url])
    buckets = await ensure_mesh(nc.jetstream(), 3)
    assert buckets.replicas == 1
    await buckets.state.put("app.ledger", b"spec")
    await nc.close()

    nats_server.stop()
    nats_server.start()
    await nats_server.wait_ready()
    nc = await nats.connect(servers=[nats_server.url])
    try:
        again = await ensure_mesh(nc.jetstream(), 3)
        assert (await again.state.get("app.ledger")).value == b"spec"
    finally:
        await nc.close()
