"""The ``harmony-leases`` view (CONTRACT section 7) on a real nats-server: holders publish
what they hold, and a late writer never puts an old holder back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.js.kv import KeyValue

from mesh.mirror import LeaseMirror
from mesh.names import LEASE_VIEW_BUCKET, lease_view_key
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually


@pytest.fixture
async def view(nats_server: NatsNode) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    yield await js.create_key_value(bucket=LEASE_VIEW_BUCKET, history=1)
    await nc.close()


async def _value(kv: KeyValue, key: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((await kv.get(key)).value or b"")
    except nats.js.errors.KeyNotFoundError:
        return None
    return data


def test_keys_follow_the_contract() -> None:
    assert lease_view_key("ledger") == "app.ledger"
    assert lease_view_key("web@site-b") == "app.web.site-b"


async def test_a_late_release_never_replaces_a_newer_holder(view: KeyValue) -> None:
    a = LeaseMirror(view, "site-a", "n1")
    b = LeaseMirror(view, "site-b", "n1")
    tasks = [asyncio.create_task(m.run()) for m in (a, b)]
    try:
        a.acquired("ledger", 5, 0.0)
        assert await a.flush(5.0)
        assert (await _value(view, "app.ledger") or {}).get("holder") == "site-a/n1"
        b.acquired("ledger", 6, 0.0)
        assert await b.flush(5.0)
        a.lost("ledger", 5, "expired")  # site-a learns late that it lost token 5
        assert await a.flush(5.0)
        value = await _value(view, "app.ledger")
        assert value is not None
        assert (value["holder"], value["token"], value["state"]) == ("site-b/n1", 6, "held")
        b.lost("ledger", 6, "released")
        assert await b.flush(5.0)
        value = await eventually(lambda: _value(view, "app.ledger"), what="the release")
        assert (value["holder"], value["token"], value["state"]) == ("site-b/n1", 6, "released")
        b.acquired("web@site-b", 9, 0.0)
        assert await b.flush(5.0)
        slot = await _value(view, "app.web.site-b")
        assert slot is not None and slot["token"] == 9
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
