"""Bootstrap is idempotent: concurrent agents, restarts, replica capping, the descriptor."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import KeyValueConfig, StreamConfig, StreamInfo
from nats.js.errors import APIError

from mesh.bootstrap import MeshMismatch, ensure_descriptor, ensure_mesh, ensure_store
from mesh.clock import now_rfc3339
from mesh.descriptor import Descriptor
from mesh.names import EVENTS_STREAM, STATE_BUCKET, TRUST_BUCKET, store_stream
from tests.harness.nats import NatsCluster, NatsNode, writable
from tests.harness.wait import eventually


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
        await writable(nats_cluster.urls[:2], [STATE_BUCKET])  # interest reached both servers
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


async def test_a_store_whose_server_joins_late_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The meta leader learns a server's tags only once it has joined; an agent starting
    with its cluster must wait for the tagged server, not refuse a correct store list."""
    cluster = NatsCluster(tmp_path / "c")
    first, second, late = cluster.nodes
    first.start()
    second.start()
    nc = await nats.connect(servers=[first.url, second.url])
    try:

        def meta_leader() -> bool:
            meta = first.varz("jsz").get("meta_cluster")
            return isinstance(meta, dict) and bool(meta.get("leader"))

        await eventually(meta_leader, timeout=30, what="meta leader of two nodes")
        js = nc.jetstream(timeout=5)
        refused = asyncio.Event()
        real = js.add_stream

        async def add_stream(config: StreamConfig, **params: Any) -> StreamInfo:
            try:
                return await real(config, **params)
            except APIError:
                refused.set()
                raise

        monkeypatch.setattr(js, "add_stream", add_stream)
        task = asyncio.create_task(ensure_store(js, late.name, grace=60))
        await asyncio.wait_for(refused.wait(), 30)
        assert not task.done(), "the store request gave up while its server was joining"
        late.start()
        await asyncio.wait_for(task, 60)
        info = await js.stream_info(store_stream(late.name))
        assert info.cluster is not None and info.cluster.leader == late.name
    finally:
        await nc.close()
        cluster.stop()


async def test_a_store_without_its_site_server_is_a_clear_error(nats_cluster: NatsCluster) -> None:
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        with pytest.raises(MeshMismatch, match="no JetStream server tagged site:nowhere"):
            await ensure_mesh(nc.jetstream(timeout=15), 3, stores=["nowhere"], peer_grace=1.0)
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


class _RacedState:
    """The state bucket as an agent sees it when another agent writes the descriptor
    between our read (none yet) and our create: the real bucket, with the other agent's
    write replayed just before our first create."""

    def __init__(self, kv: Any, theirs: Descriptor) -> None:
        self.kv, self.theirs, self.raced = kv, theirs, False

    async def get(self, key: str) -> Any:
        return await self.kv.get(key)

    async def create(self, key: str, value: bytes) -> int:
        if not self.raced:
            self.raced = True
            await self.kv.create(key, self.theirs.encode())
        return int(await self.kv.create(key, value))


async def test_an_agent_losing_the_descriptor_race_takes_the_winners(
    nats_server: NatsNode,
) -> None:
    """Two unconfigured agents bootstrapping at once each default to their own site; the
    one whose create loses must adopt the winner's descriptor, not refuse to start over a
    store list nobody configured (seen: an agent exiting with "configured ['site-a'] but
    the mesh uses ['site-c']")."""
    nc = await nats.connect(servers=[nats_server.url])
    try:
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="raced"))
        theirs = Descriptor(("site-c",), 1, now_rfc3339())
        state = _RacedState(kv, theirs)
        found = await ensure_descriptor(state, None, 1, default=["site-a"])  # type: ignore[arg-type]
        assert state.raced, "the race was not replayed, so this proves nothing"
        assert found.stores == ("site-c",)
    finally:
        await nc.close()
