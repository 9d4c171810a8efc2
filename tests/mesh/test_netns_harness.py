"""The partition harness: a cut site cannot write, the majority can, and heal restores it."""

from __future__ import annotations

import nats
from nats.js.api import KeyValueConfig

from tests.harness.netns import Sites
from tests.harness.wait import eventually


async def _put(url: str, key: str) -> bool:
    nc = await nats.connect(servers=[url], connect_timeout=2, max_reconnect_attempts=0)
    try:
        kv = await nc.jetstream(timeout=2).key_value("netns")
        await kv.put(key, b"x")
        return True
    except Exception:
        return False
    finally:
        await nc.close()


async def test_cut_site_cannot_write_majority_can(netns_sites: Sites) -> None:
    a = netns_sites["site-a"]
    nc = await nats.connect(servers=[a.url])
    try:
        js = nc.jetstream(timeout=5)
        await eventually(
            lambda: js.create_key_value(KeyValueConfig(bucket="netns", replicas=3)),
            timeout=30,
            what="R3 bucket on the stretched cluster",
        )
    finally:
        await nc.close()

    netns_sites.cut("site-a")
    b = netns_sites["site-b"]
    await eventually(lambda: _put(b.url, "k"), timeout=30, what="majority write after cut")
    assert not await _put(a.url, "k"), "a cut-off site must not be able to write"

    netns_sites.heal("site-a")
    await eventually(lambda: _put(a.url, "k2"), timeout=30, what="write from healed site")
