"""``cmd``: marks written by the CLI itself, failover and ping through the command plane of
an in-process server, and every verb audited on ``harmony.audit.<user>.<verb>``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest

from agent.commands import CommandServer, read_marks
from tests.cli.conftest import Invoke, Mesh
from tests.commands.conftest import FakeController
from tests.commands.helpers import heartbeat, seed_world
from tests.harness.wait import eventually


@pytest.fixture
async def served(mesh: Mesh) -> AsyncIterator[tuple[Mesh, FakeController]]:
    await seed_world(mesh.buckets, mesh.nc)
    controller = FakeController()
    server = CommandServer(
        mesh.nc, mesh.buckets.state, site="site-a", node="node-1", failover=controller.failover
    )
    await server.start()
    await server.sync_apps({"ledger"})
    try:
        yield mesh, controller
    finally:
        await server.stop()


async def audit_events(mesh: Mesh) -> list[tuple[str, dict[str, object]]]:
    """(subject, body) of every audit event in the stream, oldest first."""
    js = mesh.nc.jetstream()
    sub = await js.subscribe("harmony.audit.>", ordered_consumer=True)
    out: list[tuple[str, dict[str, object]]] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                return out
            out.append((msg.subject, json.loads(msg.data)))
    finally:
        await sub.unsubscribe()


async def test_drain_and_undrain(
    served: tuple[Mesh, FakeController], invoke: Invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    mesh, _ = served
    monkeypatch.setenv("HARMONY_AUDIT_USER", "Jane.Doe")  # no identity: the configured name
    result = await invoke("cmd", "-s", mesh.url, "drain", "site-b", "--reason", "kernel update")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "site site-b drained: ledger, web move to other sites; `cmd undrain site-b` lifts it\n"
    )
    drains, _ = await read_marks(mesh.buckets.state)
    assert drains["site-b"].reason == "kernel update" and drains["site-b"].by == "jane-doe"
    [(subject, event)] = await audit_events(mesh)
    assert subject == "harmony.audit.jane-doe.drain"
    assert event["site"] == "site-b" and event["outcome"] == "ok" and event["changed"] is True
    again = await invoke("cmd", "-s", mesh.url, "drain", "site-b")
    assert "already drained (by " in again.stdout

    status = json.loads((await invoke("status", "-s", mesh.url, "-o", "json")).stdout)
    assert [s["drained"] for s in status["sites"]] == [False, True, False]

    undone = await invoke("cmd", "-s", mesh.url, "undrain", "site-b")
    assert undone.exit_code == 0 and undone.stdout == "site site-b undrained\n"


async def test_fence_resume_and_json_output(
    served: tuple[Mesh, FakeController], invoke: Invoke
) -> None:
    mesh, _ = served
    fenced = await invoke("cmd", "-s", mesh.url, "fence", "web")
    assert fenced.exit_code == 0 and fenced.stdout.startswith("web fenced: stopped everywhere")
    reply = await invoke("cmd", "-s", mesh.url, "-o", "json", "resume", "web")
    body = json.loads(reply.stdout)
    assert body["ok"] and body["changed"] is True and body["verb"] == "resume"
    verbs = [(s.split(".")[-1], e["app"], e["outcome"]) for s, e in await audit_events(mesh)]
    assert verbs == [("fence", "web", "ok"), ("resume", "web", "ok")]


async def test_failover_goes_to_the_holder(
    served: tuple[Mesh, FakeController], invoke: Invoke
) -> None:
    mesh, controller = served
    result = await invoke("cmd", "-s", mesh.url, "failover", "ledger", "--to", "site-b")
    assert result.exit_code == 0, result.output
    assert result.stdout == "ledger: handing over to site-b (served by site-a/node-1)\n"
    assert controller.calls == [("ledger", "site-b")]

    controller.refuse = "no healthy agent on site-b"
    refused = await invoke("cmd", "-s", mesh.url, "failover", "ledger", "--to", "site-b")
    assert refused.exit_code == 1
    assert refused.stderr == (
        "harmony-agent: error: failover refused by site-a/node-1: no healthy agent on site-b\n"
    )
    nobody = await invoke("cmd", "-s", mesh.url, "failover", "web")
    assert nobody.exit_code == 1
    assert nobody.stderr == (
        "harmony-agent: error: web: no agent holds it now, so there is no running instance "
        "to move (see `harmony-agent status`)\n"
    )
    unknown = await invoke("cmd", "failover", "nope", "-s", mesh.url)
    assert (unknown.exit_code, unknown.stderr) == (
        1,
        "harmony-agent: error: unknown application nope\n",
    )


async def test_refusals_and_bad_input(served: tuple[Mesh, FakeController], invoke: Invoke) -> None:
    mesh, _ = served
    unknown = await invoke("cmd", "-s", mesh.url, "fence", "nope")
    assert unknown.exit_code == 1 and "unknown application 'nope'" in unknown.stderr
    typo = await invoke("cmd", "-s", mesh.url, "drain", "site-x")
    assert typo.exit_code == 1 and "unknown site 'site-x'" in typo.stderr
    for args in (["drain", "Site_B"], ["fence", "a.b"], ["failover", "ledger", "--to", "x y"]):
        bad = await invoke("cmd", "-s", mesh.url, *args)
        assert bad.exit_code == 2, (args, bad.output)
    via = await invoke("cmd", "-s", mesh.url, "--via", "site-b/node-1", "--timeout", "1s", "ping")
    assert via.exit_code == 1 and "no agent serves harmony.cmd.site-b.node-1.ping" in via.stderr
    ok = await invoke("cmd", "-s", mesh.url, "ping")
    assert ok.exit_code == 0 and "site-a/node-1" in ok.stdout


async def test_no_live_agent(mesh: Mesh, invoke: Invoke) -> None:
    result = await invoke("cmd", "-s", mesh.url, "ping")
    assert result.exit_code == 1 and "no healthy agent" in result.stderr
    # Marks need no agent: the CLI writes them (an unknown site is still refused).
    unknown = await invoke("cmd", "-s", mesh.url, "drain", "site-a")
    assert unknown.exit_code == 1 and "unknown site 'site-a' (known: none)" in unknown.stderr
    [(_, event)] = await audit_events(mesh)
    assert event["outcome"] == "refused" and "unknown site" in str(event["error"])


async def test_an_idle_agent_still_serves_commands(mesh: Mesh, invoke: Invoke) -> None:
    """An agent rewrites its record on change and once a minute (its liveness is its
    session in the lease stores): ``cmd`` must still route to an idle agent whose record
    is older than 2 x ttl (seen: every ``cmd ping`` against a quiet mesh said "no healthy
    agent" once the agents had been idle for 2 x ttl)."""
    await seed_world(mesh.buckets, mesh.nc)
    await mesh.buckets.state.put("agent.site-a.node-1", heartbeat("site-a", "node-1", ttl=0.1))
    server = CommandServer(mesh.nc, mesh.buckets.state, site="site-a", node="node-1")
    await server.start()
    try:
        written = time.monotonic()
        await eventually(
            lambda: time.monotonic() - written > 0.5, timeout=5, what="the record 5 ttls old"
        )
        ok = await invoke("cmd", "-s", mesh.url, "ping")
        assert ok.exit_code == 0, ok.output
    finally:
        await server.stop()
