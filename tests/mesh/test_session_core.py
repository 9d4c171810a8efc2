"""One agent's session in real lease stores: renewals, late landings, foreign writes, the
ghost a cancelled open could leave, and a duplicate agent id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from mesh.bootstrap import ensure_mesh
from mesh.clock import boottime
from mesh.names import expiry_key, session_family, session_key, store_subject
from mesh.records import ExpiryRecord, SessionState, parse_session
from mesh.session import SessionCore
from mesh.stores import Store
from tests.harness.nats import NatsNode

TTL = 1.0


@pytest.fixture
async def nc(nats_server: NatsNode) -> AsyncIterator[Client]:
    conn = await nats.connect(nats_server.url)
    await ensure_mesh(conn.jetstream(), 1, stores=["solo"])
    yield conn
    await conn.close()


def core(nc: Client, node: str = "n1") -> SessionCore:
    return SessionCore(nc, ["solo"], "site-a", node, ttl=TTL, margin=0.1)


async def last_record(nc: Client) -> tuple[str, SessionState]:
    entry = await Store(nc, "solo").last(session_family("site-a", "n1"), 2.0)
    assert entry is not None
    rec = parse_session(entry.value)
    assert rec is not None
    return entry.key, rec.state


async def test_renewals_extend_validity_from_their_send_time(nc: Client) -> None:
    """Validity runs from when a write was sent, never from when its answer came back.

    Every answer here comes back ``SLOW`` after the write landed: counted from the answer,
    validity would reach ``SLOW`` past what the store can vouch for. (With instant local
    answers, send and answer times coincide and that bug could not fail this test.)"""
    slow = 0.3
    c = core(nc)
    store = c.stores["solo"]
    real_cas = store.cas

    async def slow_answer(*args: Any, **kwargs: Any) -> int:
        seq = await real_cas(*args, **kwargs)
        await asyncio.sleep(slow)  # the answer is slow to come back; the write has landed
        return seq

    store.cas = slow_answer  # type: ignore[method-assign]
    before = boottime()
    assert await c.open("solo")
    first = c.view().stores["solo"]
    assert first.live and before + TTL - 0.1 <= first.fresh_until
    assert first.fresh_until <= boottime() - slow + TTL - 0.1, "counted from the answer"
    assert await c.renew("solo")
    renewed = c.view().stores["solo"]
    assert renewed.fresh_until > first.fresh_until and renewed.seq > first.seq
    assert renewed.fresh_until <= boottime() - slow + TTL - 0.1, "counted from the answer"


async def test_a_foreign_write_ends_the_epoch_and_a_new_one_opens(nc: Client) -> None:
    c = core(nc)
    assert await c.open("solo")
    epoch = c.view().epoch("solo")
    # A contender's expiry lands in our family: our next renewal must not succeed over it.
    await nc.jetstream().publish(
        store_subject("solo", expiry_key("site-a", "n1", "site-b", "n1")),
        ExpiryRecord(epoch).encode(),
    )
    assert await c.renew("solo")  # it notices, gives the epoch up here, opens a new one
    assert c.view().epoch("solo") not in ("", epoch)


async def test_close_also_closes_the_ghost_of_a_cancelled_open(nc: Client) -> None:
    """Issue 9 item 8: close() ran while open() was in flight; the open's write landed but
    its answer was lost. The store must not keep an ``alive`` record nobody renews.

    The open really is cancelled after its write landed (not marked not-live after a
    completed open): an epoch that became "ours" only once the answer came back would
    leave the ghost, and the old form of this test could not see that."""
    c = core(nc)
    store = c.stores["solo"]
    real_cas = store.cas

    async def landed_then_cancelled(*args: Any, **kwargs: Any) -> int:
        await real_cas(*args, **kwargs)  # the open's write lands in the store...
        raise asyncio.CancelledError  # ...and close() cancels the open before it hears so

    store.cas = landed_then_cancelled  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await c.open("solo")
    store.cas = real_cas  # type: ignore[method-assign]
    assert not c.view().stores["solo"].live
    assert (await last_record(nc))[1] is SessionState.ALIVE  # the ghost (test premise)
    await c.close()
    key, state = await last_record(nc)
    assert key == session_key("site-a", "n1") and state is SessionState.CLOSED


async def test_a_live_foreign_epoch_is_waited_out_before_it_is_replaced(nc: Client) -> None:
    """A duplicate agent id, or a restart right after a crash: the new process waits until
    the old record stayed unchanged for a full ttl before opening over it."""
    old = core(nc)
    assert await old.open("solo")
    new = core(nc)
    started = boottime()
    opening = asyncio.create_task(new.open("solo"))
    await asyncio.sleep(TTL / 3)
    assert await old.renew("solo")  # the old process is alive: the wait starts over
    assert await opening
    assert boottime() - started >= TTL + TTL / 3 - 0.05
