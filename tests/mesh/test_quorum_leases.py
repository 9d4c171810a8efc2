"""Leases over three single-replica stores on a real 3-node cluster: the core properties."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mesh.clock import boottime, wall_ms
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


def holders(contenders: list[Contender], lease: str = "ledger") -> list[str]:
    return [c.id for c in contenders if lease in c.held()]


async def test_best_ranked_acquires_with_a_time_floored_term(trio: list[Contender]) -> None:
    before = wall_ms()
    for rank, c in enumerate(trio):
        c.want(["ledger"], rank=rank)
    await eventually(lambda: holders(trio) == ["site-0/n1"], timeout=10, what="rank 0 holds")
    term = trio[0].held()["ledger"]
    assert term >= before, "the first term is floored at the wall-clock milliseconds"
    manager = trio[0].manager
    assert manager is not None
    await eventually(
        lambda: len(manager.observe()["ledger"].support) == 3, timeout=5, what="all 3 stores"
    )
    assert trio[0].held()["ledger"] == term


async def test_killed_holder_is_taken_over_after_a_full_ttl(trio: list[Contender]) -> None:
    for rank, c in enumerate(trio):
        c.want(["ledger"], rank=rank)
    await eventually(lambda: holders(trio) == ["site-0/n1"], timeout=10, what="rank 0 holds")
    old = trio[0].held()["ledger"]
    assert trio[0].session is not None
    last = max(s.fresh_until for s in trio[0].session.view().stores.values())
    await trio[0].kill()
    await eventually(lambda: holders(trio[1:]) == ["site-1/n1"], timeout=TTL + 5, what="takeover")
    assert trio[1].held()["ledger"] > old
    assert trio[1].acquired_at["ledger"] >= last, "taken over while the old holder believed"
    check_history(c for t in trio for c in t.intervals())


async def test_a_paused_holder_stops_believing_before_anyone_takes_over(
    trio: list[Contender],
) -> None:
    for rank, c in enumerate(trio):
        c.want(["ledger"], rank=rank)
    await eventually(lambda: holders(trio) == ["site-0/n1"], timeout=10, what="rank 0 holds")
    trio[0].pause()
    await eventually(lambda: holders(trio) == ["site-1/n1"], timeout=TTL + 5, what="takeover")
    assert trio[0].held() == {}
    check_history(i for t in trio for i in t.intervals())


async def test_losing_one_store_interrupts_no_holder(
    nats_cluster: NatsCluster, trio: list[Contender]
) -> None:
    """A bystander: the node of one store dies; sessions live on the two others."""
    for rank, c in enumerate(trio):
        c.want(["ledger"], rank=rank)
    await eventually(lambda: holders(trio) == ["site-0/n1"], timeout=10, what="rank 0 holds")
    nats_cluster.nodes[2].kill()
    start = boottime()
    term = trio[0].held()["ledger"]
    while boottime() - start < 3 * TTL:
        assert holders(trio) == ["site-0/n1"], "a store's loss moved the lease"
        await asyncio.sleep(0.05)
    assert trio[0].held()["ledger"] == term
    assert trio[0].manager is not None and not trio[0].manager.tenures


async def test_release_and_handover_move_without_expiry(trio: list[Contender]) -> None:
    for rank, c in enumerate(trio):
        c.want(["ledger"], rank=rank)
    await eventually(lambda: holders(trio) == ["site-0/n1"], timeout=10, what="rank 0 holds")
    assert trio[0].manager is not None
    stopped: list[float] = []

    async def stop() -> None:
        stopped.append(boottime())

    assert await trio[0].manager.release("ledger", to="site-2", stop=stop)
    await eventually(lambda: holders(trio) == ["site-2/n1"], timeout=TTL, what="handover")
    assert trio[2].acquired_at["ledger"] - stopped[0] < TTL, "waited for an expiry"
    assert trio[2].manager is not None
    assert await trio[2].manager.release("ledger")
    await eventually(lambda: holders(trio) == ["site-1/n1"], timeout=TTL, what="release")
    check_history(i for t in trio for i in t.intervals())


async def test_a_lease_is_taken_again_as_soon_as_the_session_is_valid_again(
    trio: list[Contender],
) -> None:
    """A quorum that comes back (here: renewals that resume in the same epochs after a
    pause) wakes every lease that waited because "our session is not valid". Nothing else
    changes then, so without that wake-up the lease waited for its backstop (30 s after
    the quorum returned, seen in ``test_quorum_lost_everything_stops``); the backstop is
    moved out of reach so only the wake-up can make this pass."""
    holder = trio[0]
    assert holder.manager is not None and holder.session is not None
    holder.manager._backstop = 3600.0
    holder.want(["ledger"])
    await eventually(lambda: holders(trio) == ["site-0/n1"], timeout=10, what="site-0 holds")
    epochs = {b: s.epoch for b, s in holder.session.view().stores.items()}
    holder.pause()
    await eventually(lambda: holders(trio) == [], timeout=TTL + 5, what="validity ran out")
    holder.resume()
    await eventually(lambda: holders(trio) == ["site-0/n1"], timeout=30, what="taken again")
    assert {b: s.epoch for b, s in holder.session.view().stores.items()} == epochs, (
        "the session opened new epochs: that wakes every lease anyway, and is not this case"
    )
    check_history(i for t in trio for i in t.intervals())
