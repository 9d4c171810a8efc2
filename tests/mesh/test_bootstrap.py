"""Bootstrap is idempotent: concurrent agents, restarts, replica capping, the descriptor."""

from __future__ import annotations

import asyncio

import nats
import pytest

from mesh.bootstrap import MeshMismatch, ensure_mesh
from mesh.names import EVENTS_STREAM, STATE_BUCKET, TRUST_BUCKET, store_stream
from tests.harness.nats import NatsCluster, NatsNode


async def test_two_agents_bootstrap_at_once_on_cluster(nats_cluster: NatsCluster) -> None:
    a = await nats.connect(servers=[nats_cluster.urls[0]])
    b = await nats.connect(servers=[nats_cluster.urls[1]])
    stores = nats_cluster.stores
    try:
        ma, mb = await asyncio.gather(
            ensure_mesh(a.jetstream(timeout=15), 3, stores=stores),
            ensure_mesh(b.jetstream(timeout=15), 3, stores=stores),
        )
        assert ma.replicas == mb.replicas == 3 and ma.stores == mb.stores == stores
        await ma.state.put("agent.x.y", b"1")
        assert (await mb.state.get("agent.x.y")).value == b"1"
        js = a.jetstream()
        for stream in (f"KV_{STATE_BUCKET}", f"KV_{TRUST_BUCKET}", EVENTS_STREAM):
            assert (await js.stream_info(stream)).config.num_replicas == 3
        for node, store in zip(nats_cluster.nodes, stores, strict=True):
            info = await js.stream_info(store_stream(store))
            assert info.config.num_replicas == 1
            assert info.cluster is not None and info.cluster.leader == node.name, (
                f"store {store} must live on the server tagged site:{store}"
            )
    finally:
        await a.close()
        await b.close()


async def test_a_different_store_list_is_refused(nats_cluster: NatsCluster) -> None:
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        await ensure_mesh(nc.jetstream(timeout=15), 3, stores=nats_cluster.stores)
        with pytest.raises(MeshMismatch, match=r"mesh\.stores"):
            await ensure_mesh(nc.jetstream(timeout=15), 3, stores=nats_cluster.stores[:2])
        adopted = await ensure_mesh(nc.jetstream(timeout=15), 3, default_stores=["other"])
        assert adopted.stores == nats_cluster.stores  # a default never overrides the mesh
    finally:
        await nc.close()


async def test_a_store_without_its_site_server_is_a_clear_error(nats_cluster: NatsCluster) -> None:
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        with pytest.raises(MeshMismatch, match="no JetStream server tagged site:nowhere"):
            await ensure_mesh(nc.jetstream(timeout=15), 3, stores=["nowhere"])
    finally:
        await nc.close()


async def test_replicas_capped_on_single_node_and_restart_keeps_data(nats_server: NatsNode) -> None:
    nc = await nats.connect(servers=[nats_server.url])
    mesh = await ensure_mesh(nc.jetstream(), 3, stores=["solo"])
    assert mesh.replicas == 1
    await mesh.state.put("app.ledger", b"spec")
    await nc.close()

    nats_server.stop()
    nats_server.start()
    await nats_server.wait_ready()
    nc = await nats.connect(servers=[nats_server.url])
    try:
        again = await ensure_mesh(nc.jetstream(), 3)
        assert (await again.state.get("app.ledger")).value == b"spec"
        assert again.stores == ["solo"]
    finally:
        await nc.close()
