"""One agent's session in real lease stores: renewals, late landings, foreign writes, the
ghost a cancelled open could leave, and a duplicate agent id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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
    c = core(nc)
    before = boottime()
    assert await c.open("solo")
    first = c.view().stores["solo"]
    assert first.live and before + TTL - 0.1 <= first.fresh_until <= boottime() + TTL - 0.1
    assert await c.renew("solo")
    assert c.view().stores["solo"].fresh_until > first.fresh_until
    assert c.view().stores["solo"].seq > first.seq


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
    its answer was lost. The store must not keep an ``alive`` record nobody renews."""
    c = core(nc)
    assert await c.open("solo")
    c._set("solo", live=False)  # the open's answer never reached us
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
