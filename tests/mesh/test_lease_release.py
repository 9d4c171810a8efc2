"""Planned moves: release and handover need no expiry wait; a healthy holder stays put."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from tests.harness.nats import NatsNode
from tests.harness.wait import eventually
from tests.mesh.lease_world import Contender, check_history

TTL = 30.0  # any takeover within seconds proves no expiry wait was involved


@pytest.fixture
async def agents(nats_server: NatsNode) -> AsyncIterator[dict[str, Contender]]:
    made: dict[str, Contender] = {}
    for site in ("site-a", "site-b", "site-c"):
        c = Contender([nats_server.url], site, "n1", ttl=TTL, margin=1.0, step=0.05)
        await c.start()
        made[site] = c
    yield made
    for c in made.values():
        await c.kill()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_release_lets_the_standby_acquire_without_expiry(
    agents: dict[str, Contender],
) -> None:
    a, b = agents["site-a"], agents["site-b"]
    acquisitions = metric("harmony_lease_acquisitions_total")
    releases = metric("harmony_lease_losses_total", reason="released")
    a.want(["ledger"], rank=0)
    await eventually(a.held, timeout=5, what="a holds")
    b.want(["ledger"], rank=1)
    assert metric("harmony_lease_acquisitions_total") == acquisitions + 1
    assert metric("harmony_leases_held") >= 1
    token = a.held()["ledger"]

    seen_during_stop: list[tuple[dict[str, int], dict[str, int]]] = []

    async def stop_workload() -> None:
        seen_during_stop.append((a.held(), b.held()))

    assert a.manager is not None
    assert await a.manager.release("ledger", stop=stop_workload)
    # the workload was stopped while the lease still protected it, and nobody else had it
    assert seen_during_stop == [({"ledger": token}, {})]
    assert a.held() == {}
    await eventually(b.held, timeout=5, what="standby acquires, well before ttl")
    assert b.held()["ledger"] > token
    check_history(iv for c in (a, b) for iv in c.intervals())
    assert metric("harmony_lease_losses_total", reason="released") == releases + 1


async def test_handover_goes_to_its_target_even_past_a_better_rank(
    agents: dict[str, Contender],
) -> None:
    a, b, c = agents["site-a"], agents["site-b"], agents["site-c"]
    a.want(["ledger"], rank=0)
    await eventually(a.held, timeout=5, what="a holds")
    b.want(["ledger"], rank=1)
    c.want(["ledger"], rank=2)
    token = a.held()["ledger"]
    assert a.manager is not None
    assert await a.manager.handover("ledger", "site-c")
    await eventually(c.held, timeout=5, what="target acquires")
    assert c.held()["ledger"] > token
    assert b.held() == {}
    assert b.manager is not None
    assert "held by site-c/n1" in b.manager.observe()["ledger"].decision
    check_history(iv for x in (a, b, c) for iv in x.intervals())


async def test_healthy_holder_is_not_preempted_by_a_better_ranked_site(
    agents: dict[str, Contender],
) -> None:
    a, b = agents["site-a"], agents["site-b"]
    b.want(["ledger"], rank=1)
    await eventually(b.held, timeout=5, what="b holds (no better site yet)")
    token = b.held()["ledger"]
    a.want(["ledger"], rank=0)
    assert a.manager is not None
    await eventually(
        lambda: "alive" in a.manager.observe()["ledger"].decision,  # type: ignore[union-attr]
        timeout=5,
        what="a sees a live holder",
    )
    assert b.session is not None
    rev = b.session.revision or 0
    await b.session.renew()
    await b.session.renew()
    assert (b.session.revision or 0) > rev
    assert b.held() == {"ledger": token}
    assert a.held() == {}


async def test_many_leases_cost_no_lease_writes_to_hold(agents: dict[str, Contender]) -> None:
    """Renewal is per session: holding 50 leases writes nothing to their keys."""
    a = agents["site-a"]
    names = [f"many-{i}" for i in range(50)]
    a.want(names)
    await eventually(lambda: len(a.held()) == 50, timeout=10, what="all 50 held")
    assert a.buckets is not None and a.session is not None
    before = (await a.buckets.leases.status()).stream_info.state.last_seq
    for _ in range(3):
        await a.session.renew()
    assert (await a.buckets.leases.status()).stream_info.state.last_seq == before
    assert set(a.held().values()) == {a.held()[n] for n in names}


async def test_a_new_lease_goes_by_rank_even_to_a_later_contender(nats_server: NatsNode) -> None:
    """A key that is free from the start counts as freed when each contender started wanting
    it, so the better-ranked site wins a new lease although a worse one asked first."""
    early = Contender([nats_server.url], "site-c", "n1", ttl=TTL, margin=1.0, step=0.5)
    late = Contender([nats_server.url], "site-a", "n1", ttl=TTL, margin=1.0, step=0.5)
    await early.start()
    await late.start()
    try:
        # Precondition, not synchronisation: the key has been free (in early's watch) for
        # longer than early's rank delay (2 x 0.5 s), so counting from the watch's start
        # would let early take it the moment it asks.
        await asyncio.sleep(1.5)
        early.want(["fresh"], rank=2)
        # early asks first, by a margin well inside its 1 s rank delay
        await asyncio.sleep(0.3)
        late.want(["fresh"], rank=0)
        await eventually(late.held, timeout=3, what="the best-ranked site takes the new lease")
        assert early.held() == {}
    finally:
        await early.kill()
        await late.kill()
