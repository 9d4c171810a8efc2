"""Every verb over real NATS, bad input of every kind, and a garbage flood."""

from __future__ import annotations

import asyncio
import json

import nats
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from agent.commands import CommandServer, drain_key, fence_key, read_marks
from tests.commands.conftest import Plane
from tests.commands.helpers import connect
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

AGENT = "harmony.cmd.site-a.node-1"


async def test_ping_names_the_agent_and_what_it_holds(plane: Plane) -> None:
    reply = await plane.request(f"{AGENT}.ping", b"")
    assert reply.ok and reply.fields["agent"] == "site-a/node-1"
    assert reply.fields["held"] == ["ledger"]


async def test_drain_writes_a_mark_once_and_undrain_removes_it(plane: Plane) -> None:
    body = json.dumps({"site": "site-b", "by": "ops@test", "reason": "maintenance"}).encode()
    first = await plane.request(f"{AGENT}.drain", body)
    assert first.ok and first.fields["changed"] is True and first.fields["by"] == "ops@test"
    again = await plane.request(f"{AGENT}.drain", json.dumps({"site": "site-b"}).encode())
    assert again.ok and again.fields["changed"] is False
    assert again.fields["by"] == "ops@test"  # the original mark is kept

    entry = await plane.buckets.state.get(drain_key("site-b"))
    stored = json.loads(entry.value or b"")
    assert stored["kind"] == "drain" and stored["site"] == "site-b"
    assert stored["reason"] == "maintenance"
    drains, fences = await read_marks(plane.buckets.state)
    assert set(drains) == {"site-b"} and fences == {}

    undone = await plane.request(f"{AGENT}.undrain", json.dumps({"site": "site-b"}).encode())
    assert undone.ok and undone.fields["changed"] is True
    assert (await read_marks(plane.buckets.state))[0] == {}
    noop = await plane.request(f"{AGENT}.undrain", json.dumps({"site": "site-b"}).encode())
    assert noop.ok and noop.fields["changed"] is False


async def test_drain_of_an_unknown_site_is_refused(plane: Plane) -> None:
    reply = await plane.request(f"{AGENT}.drain", json.dumps({"site": "site-x"}).encode())
    assert not reply.ok and "unknown site 'site-x'" in (reply.error or "")
    assert "site-a, site-b, site-c" in (reply.error or "")


async def test_fence_and_resume(plane: Plane) -> None:
    reply = await plane.request(f"{AGENT}.fence", json.dumps({"app": "ledger"}).encode())
    assert reply.ok and reply.fields["changed"] is True
    assert (await read_marks(plane.buckets.state))[1].keys() == {"ledger"}
    # The holder also serves it on the application's subject; the body may be empty.
    again = await plane.request("harmony.cmd.app.ledger.fence", b"")
    assert again.ok and again.fields["changed"] is False
    resumed = await plane.request("harmony.cmd.app.ledger.resume", b"")
    assert resumed.ok and resumed.fields["changed"] is True
    try:
        await plane.buckets.state.get(fence_key("ledger"))
        raise AssertionError("fence mark still present")
    except KeyNotFoundError:
        pass


async def test_unknown_application_is_refused(plane: Plane) -> None:
    for verb in ("fence", "resume", "failover"):
        reply = await plane.request(f"{AGENT}.{verb}", json.dumps({"app": "nope"}).encode())
        assert not reply.ok and reply.error == "unknown application 'nope'", (verb, reply)
    assert plane.controller.calls == []


async def test_failover_reaches_the_controller_on_the_app_subject(plane: Plane) -> None:
    reply = await plane.request(
        "harmony.cmd.app.ledger.failover", json.dumps({"to": "site-b", "by": "t"}).encode()
    )
    assert reply.ok, reply
    assert reply.fields["app"] == "ledger" and reply.fields["to"] == "site-b"
    assert plane.controller.calls == [("ledger", "site-b")]

    plane.controller.refuse = "site-b has no healthy agent"
    refused = await plane.request("harmony.cmd.app.ledger.failover", b"{}")
    assert not refused.ok and refused.error == "site-b has no healthy agent"

    plane.controller.explode = True
    broken = await plane.request("harmony.cmd.app.ledger.failover", b"{}")
    assert not broken.ok and "internal error: RuntimeError" in (broken.error or "")
    assert (await plane.request(f"{AGENT}.ping", b"")).ok


async def test_a_retried_request_id_gets_the_first_answer_without_acting_again(
    plane: Plane,
) -> None:
    """A client whose reply was lost retries with the same request id: the agent answers
    with its first reply (even while the first is still in progress) and acts once."""
    gate = asyncio.Event()

    async def slow(app: str, to_site: str | None) -> object:
        await gate.wait()
        return await plane.controller.failover(app, to_site)

    plane.server.failover = slow  # type: ignore[assignment]
    body = json.dumps({"to": "site-b", "request_id": "r-1"}).encode()
    first = asyncio.create_task(plane.request("harmony.cmd.app.ledger.failover", body, 10))
    await eventually(lambda: plane.server._recent, what="the first request received")
    retry = asyncio.create_task(plane.request("harmony.cmd.app.ledger.failover", body, 10))
    await eventually(lambda: plane.server.replayed == 1, what="the retry waiting on the first")
    gate.set()
    a, b = await first, await retry
    assert a.ok and a == b
    later = await plane.request("harmony.cmd.app.ledger.failover", body)
    assert later == a
    assert plane.controller.calls == [("ledger", "site-b")]  # acted on once
    other = json.dumps({"to": "site-c", "request_id": "r-1"}).encode()
    reused = await plane.request("harmony.cmd.app.ledger.failover", other)
    assert not reused.ok and "already used for another request" in (reused.error or "")
    assert plane.controller.calls == [("ledger", "site-b")]
    fresh = json.dumps({"to": "site-b", "request_id": "r-2"}).encode()
    assert (await plane.request("harmony.cmd.app.ledger.failover", fresh)).ok
    assert len(plane.controller.calls) == 2


async def test_failover_for_an_application_not_held_here(plane: Plane) -> None:
    reply = await plane.request(f"{AGENT}.failover", json.dumps({"app": "web"}).encode())
    assert not reply.ok and "does not hold 'web'" in (reply.error or "")
    # Nobody serves web's application subject: the client learns at once.
    try:
        await plane.nc.request("harmony.cmd.app.web.failover", b"{}", timeout=2)
        raise AssertionError("expected no responders")
    except nats.errors.NoRespondersError:
        pass


async def test_sync_apps_follows_what_the_controller_holds(plane: Plane) -> None:
    await plane.server.sync_apps({"web"})
    assert (await plane.request("harmony.cmd.app.web.ping", b"")).ok
    try:
        await plane.nc.request("harmony.cmd.app.ledger.ping", b"", timeout=2)
        raise AssertionError("ledger should no longer be served")
    except nats.errors.NoRespondersError:
        pass


async def test_bad_requests_get_error_replies(plane: Plane) -> None:
    cases = {
        f"{AGENT}.explode": (b"{}", "unknown verb"),
        f"{AGENT}.drain": (b"not json", "malformed JSON"),
        f"{AGENT}.fence": (b'{"app": 7}', "app: Input should be a valid string"),
        f"{AGENT}.undrain": (b"x" * (64 * 1024 + 1), "request too large"),
        "harmony.cmd.app.ledger.drain": (b"{}", "not served on application subjects"),
    }
    for subject, (data, text) in cases.items():
        reply = await plane.request(subject, data)
        assert not reply.ok and text in (reply.error or ""), (subject, reply)
        assert reply.fields["agent"] == "site-a/node-1"
    assert plane.server.rejected >= len(cases)


async def test_garbage_flood_then_still_correct(plane: Plane) -> None:
    """Thousands of bad messages (bare publishes and requests) do not stop the agent."""
    junk = [b"", b"{", b"[]", b"\x00" * 100, b'{"site": 1}', b"x" * 70_000, b"[" * 5000]
    verbs = ["drain", "fence", "nope", "failover", "ping.extra", ""]
    for i in range(3000):
        verb = verbs[i % len(verbs)]
        await plane.nc.publish(f"{AGENT}.{verb}".rstrip("."), junk[i % len(junk)])
    inbox = plane.nc.new_inbox()
    replies: list[bytes] = []

    async def collect(msg: Msg) -> None:
        replies.append(msg.data)

    sub = await plane.nc.subscribe(inbox, cb=collect)
    for i in range(500):
        await plane.nc.publish(f"{AGENT}.drain", junk[i % len(junk)], reply=inbox)
    await plane.nc.flush()
    await eventually(lambda: len(replies) >= 500, timeout=20, what="a reply to every request")
    assert (await plane.request(f"{AGENT}.ping", b"")).ok  # everything before it is answered
    await plane.nc.flush()
    await sub.unsubscribe()
    assert len(replies) == 500, f"{len(replies)} replies to 500 requests: exactly one each"
    assert all(not json.loads(r)["ok"] for r in replies)

    reply = await plane.request(f"{AGENT}.drain", json.dumps({"site": "site-c"}).encode())
    assert reply.ok and reply.fields["site"] == "site-c"
    assert (await plane.request(f"{AGENT}.ping", b"")).ok


async def test_a_slow_handler_does_not_block_other_commands(plane: Plane) -> None:
    gate = asyncio.Event()

    async def slow(app: str, to_site: str | None) -> object:
        await gate.wait()
        return await plane.controller.failover(app, to_site)

    plane.server.failover = slow  # type: ignore[assignment]
    pending = asyncio.create_task(plane.request("harmony.cmd.app.ledger.failover", b"{}", 10))
    assert (await plane.request(f"{AGENT}.ping", b"", timeout=2)).ok
    gate.set()
    assert (await pending).ok


async def test_drain_survives_a_mesh_restart(nats_server: NatsNode) -> None:
    nc, buckets = await connect(nats_server.url)
    from tests.commands.helpers import seed_world

    await seed_world(buckets, nc)
    server = CommandServer(nc, buckets.state, site="site-a", node="node-1")
    await server.start()
    try:
        msg = await nc.request(f"{AGENT}.drain", b'{"site": "site-b"}', timeout=5)
        assert json.loads(msg.data)["ok"]
    finally:
        await server.stop()
        await nc.close()

    nats_server.stop()
    nats_server.start()
    await nats_server.wait_ready()
    nc, buckets = await connect(nats_server.url)
    try:
        drains, _ = await read_marks(buckets.state)
        assert set(drains) == {"site-b"}
    finally:
        await nc.close()
