"""Sessions on a real nats-server: a live foreign epoch is never overwritten at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from mesh.bootstrap import Buckets, ensure_mesh
from mesh.session import RenewResult, Session
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

KEY = "agent.site-a.n1"


@pytest.fixture
async def buckets(nats_server: NatsNode) -> AsyncIterator[Buckets]:
    nc: Client = await nats.connect(servers=[nats_server.url])
    try:
        yield await ensure_mesh(nc.jetstream(), 1)
    finally:
        await nc.close()


async def test_duplicate_agent_does_not_overwrite_a_live_session(buckets: Buckets) -> None:
    ttl = 1.0
    first = Session(buckets.state, KEY, "site-a/n1", ttl=ttl, margin=0.1)
    assert await first.open()
    renewing = asyncio.create_task(first.run())
    second = Session(buckets.state, KEY, "site-a/n1", ttl=ttl, margin=0.1)
    opening = asyncio.create_task(second.open())
    try:
        rev = first.revision or 0
        await eventually(
            lambda: (first.revision or 0) >= rev + 4, timeout=10, what="first keeps renewing"
        )
        assert first.valid()
        assert not second.valid()

        # The first one hangs (no renewals, no close): only now may the second take over,
        # and only after watching the key unchanged for a full ttl.
        renewing.cancel()
        last_sent = first.last_write_sent
        assert last_sent is not None
        opened = await eventually(
            lambda: opening.done() and second.valid(), timeout=10, what="second opens"
        )
        assert opened
        assert second.last_write_sent is not None
        assert second.last_write_sent >= last_sent + ttl
        assert await first.renew() is RenewResult.LOST
    finally:
        renewing.cancel()
        opening.cancel()
        await second.close()


async def test_closed_session_is_replaced_at_once(buckets: Buckets) -> None:
    ttl = 30.0
    first = Session(buckets.state, KEY, "site-a/n1", ttl=ttl, margin=1.0)
    assert await first.open()
    await first.close()
    assert not first.valid()
    second = Session(buckets.state, KEY, "site-a/n1", ttl=ttl, margin=1.0)
    started = time.monotonic()
    assert await asyncio.wait_for(second.open(), 5.0)  # far less than the 30 s ttl
    assert second.last_write_sent is not None and second.last_write_sent - started < ttl
    await second.close()


async def test_deadline_timer_reports_loss_without_any_renewal_attempt(buckets: Buckets) -> None:
    """The holder learns it lost at valid_until even if nothing else happens."""
    s = Session(buckets.state, KEY, "site-a/n1", ttl=0.6, margin=0.1)
    lost = asyncio.Event()
    when: list[float] = []
    s.on_lost.append(lambda _epoch: (when.append(time.monotonic()), lost.set()))
    assert await s.open()
    deadline = s.valid_until
    await asyncio.wait_for(lost.wait(), 5.0)  # no run(): only the timer can fire
    assert when[0] >= deadline
    assert not s.valid()
