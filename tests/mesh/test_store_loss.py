"""Issue 9 item 9: losing the lease stores (deleted by hand, a disk gone) never makes a
fencing token go backwards, and never lets two holders overlap; agents recreate them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from mesh.clock import boottime
from mesh.names import store_stream
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually
from tests.mesh.lease_world import Contender, check_history, make_mesh

TTL = 2.0


@pytest.fixture
async def trio(nats_cluster: NatsCluster) -> AsyncIterator[list[Contender]]:
    urls, stores = nats_cluster.urls, nats_cluster.stores
    await make_mesh(urls, stores)
    contenders = [Contender([urls[i]], stores, f"site-{i}", ttl=TTL) for i in range(3)]
    await asyncio.gather(*(c.start() for c in contenders))
    try:
        yield contenders
    finally:
        for c in contenders:
            await c.kill()


def holders(contenders: list[Contender]) -> list[tuple[str, int]]:
    return [(c.id, t) for c in contenders for n, t in c.held().items() if n == "ledger"]


async def test_every_store_deleted_tokens_keep_increasing(
    nats_cluster: NatsCluster, trio: list[Contender]
) -> None:
    for rank, c in enumerate(trio):
        c.want(["ledger"], rank=rank)
    first = await eventually(lambda: holders(trio), timeout=10, what="a holder")
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        js = nc.jetstream(timeout=10)
        for store in nats_cluster.stores:
            await js.delete_stream(store_stream(store))
    finally:
        await nc.close()
    deleted_at = boottime()

    def new_holder() -> list[tuple[str, int]]:
        # Acquired after the deletion (not "a different token": a token that went back to
        # where it was would then read as "never held again" instead of failing below).
        return [
            (c.id, t)
            for c in trio
            for n, t in c.held().items()
            if n == "ledger" and c.acquired_at.get(n, 0.0) > deleted_at
        ]

    second = await eventually(new_holder, timeout=30, what="held again after the stores came back")
    assert len(second) == 1 and second[0][1] > first[0][1], (first, second)
    check_history(i for c in trio for i in c.intervals())
