"""Release and handover finish whatever the mesh does: a store down, the caller cancelled.

Issue 9 item 4: a failed release must not strand the lease, a cancelled one must still
land, and a timed-out handover must never turn into a plain release.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import nats
import pytest

from mesh.clock import boottime
from mesh.names import lease_claim_key, lease_family, store_bucket
from mesh.records import ClaimRecord, ClaimState
from mesh.stores import Store
from mesh.writer import Writer
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually
from tests.mesh.lease_world import Contender, check_history, make_mesh

TTL = 2.0


@pytest.fixture
async def trio(nats_cluster: NatsCluster) -> AsyncIterator[list[Contender]]:
    urls, stores = nats_cluster.urls, nats_cluster.stores
    await make_mesh(urls, stores)
    contenders = [Contender([urls[i]], stores, f"site-{i}", ttl=TTL) for i in range(2)]
    await asyncio.gather(*(c.start() for c in contenders))
    for rank, c in enumerate(contenders):
        c.want(["ledger"], rank=rank)
    await eventually(lambda: "ledger" in contenders[0].held(), timeout=10, what="site-0 holds")
    manager = contenders[0].manager
    assert manager is not None
    await eventually(
        lambda: len(manager.observe()["ledger"].support) == 3, timeout=10, what="3 stores"
    )
    try:
        yield contenders
    finally:
        for c in contenders:
            await c.kill()


async def test_a_release_with_a_store_down_lands_in_the_others_at_once(
    nats_cluster: NatsCluster, trio: list[Contender]
) -> None:
    nats_cluster.nodes[2].kill()
    holder, standby = trio
    assert holder.manager is not None
    released = boottime()
    assert await holder.manager.release("ledger")
    await eventually(lambda: "ledger" in standby.held(), timeout=TTL, what="taken at once")
    assert standby.acquired_at["ledger"] - released < TTL, "the standby waited for an expiry"
    check_history(i for c in trio for i in c.intervals())


async def test_a_cancelled_release_still_lands(trio: list[Contender]) -> None:
    holder, standby = trio
    assert holder.manager is not None
    stopped = asyncio.Event()

    async def stop() -> None:
        stopped.set()

    task = asyncio.create_task(holder.manager.release("ledger", stop=stop))
    await stopped.wait()
    task.cancel()  # the caller gives up while the writes are in flight
    await asyncio.gather(task, return_exceptions=True)
    await eventually(lambda: "ledger" in standby.held(), timeout=TTL, what="taken at once")
    check_history(i for c in trio for i in c.intervals())


async def test_a_handover_with_a_store_down_stays_a_handover(
    nats_cluster: NatsCluster, trio: list[Contender]
) -> None:
    holder, standby = trio
    down = nats_cluster.nodes[2]
    down.kill()
    assert holder.manager is not None
    await holder.manager.release("ledger", to=standby.site)
    await eventually(lambda: "ledger" in standby.held(), timeout=TTL, what="target takes it")
    down.start()
    await down.wait_ready()
    nc = await nats.connect(servers=[down.url])
    try:
        kv = await nc.jetstream(timeout=5).key_value(store_bucket(nats_cluster.stores[2]))

        async def repaired() -> bool:
            entry = await kv.get(lease_claim_key("ledger", standby.site, standby.node))
            return json.loads(entry.value or b"{}").get("state") == "held"

        # The new holder repairs its claim into the store that was down...
        await eventually(repaired, timeout=30, what="the new holder's claim in the third store")
        old = await kv.get(lease_claim_key("ledger", holder.site, holder.node))
        # ...and the old holder's write there, if any landed, was the handover: never a
        # release (a release would have let anyone take it, not just the target).
        assert json.loads(old.value or b"{}").get("state") in ("held", "handover")
        assert "ledger" in standby.held() and "ledger" not in holder.held()
    finally:
        await nc.close()


async def test_a_late_retraction_never_releases_a_later_tenure(nats_cluster: NatsCluster) -> None:
    """A release or withdrawal still retrying (its store was unreachable) may land after its
    agent claimed the lease again. It must leave the new claim alone: our own watch reads an
    older term as "not seen yet", so we would go on holding while the store showed the
    lease free to everyone else."""
    stores = nats_cluster.stores
    await make_mesh(nats_cluster.urls, stores)
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        store, family = stores[0], lease_family("ledger")
        key = lease_claim_key("ledger", "site-a", "n1")
        raw = Store(nc, store)
        first = await raw.cas(key, ClaimRecord("e1", 10).encode(), family, 0, 5.0)
        await raw.cas(key, ClaimRecord("e1", 11).encode(), family, first, 5.0)  # claimed again
        writer = Writer(nc, stores, "site-a", "n1", cas_timeout=5.0)
        late = ClaimRecord("e1", 10, ClaimState.RELEASED)
        assert await writer.retract(store, key, family, first, late, boottime() + 5) == "moved"
        entry = await raw.last(key, 5.0)
        assert entry is not None
        now = json.loads(entry.value or b"{}")
        assert (now.get("state"), now.get("term")) == ("held", 11), f"later tenure touched: {now}"
    finally:
        await nc.close()
