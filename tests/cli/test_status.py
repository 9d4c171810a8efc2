"""``status`` against known mesh contents: the JSON schema, the truth, tables, errors."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from mesh.names import lease_family
from mesh.records import ClaimState
from tests.cli.conftest import Invoke, Mesh
from tests.commands.helpers import ca_fingerprint, heartbeat, seed_world, write_claim
from tests.harness.ports import free_port
from tests.harness.wait import eventually

RFC3339 = "%Y-%m-%dT%H:%M:%S.%fZ"


def check_schema(doc: dict[str, Any]) -> None:
    """CONTRACT section 6: the fields and types every consumer may rely on."""
    assert set(doc) >= {"agents", "applications", "trust"}
    for a in doc["agents"]:
        assert isinstance(a["id"], str) and a["id"] == f"{a['site']}/{a['node']}"
        datetime.strptime(a["last_seen"], RFC3339)
        assert isinstance(a["healthy"], bool) and isinstance(a["in_quorum"], bool)
    for app in doc["applications"]:
        assert isinstance(app["name"], str)
        assert app["trait"] in ("stateful", "stateless")
        assert app["strategy"] in ("AbsoluteConsistency", "SplitBrainAllowed")
        assert app["holder"] is None or isinstance(app["holder"], str)
        assert app["fencing_token"] is None or isinstance(app["fencing_token"], int)
        for inst in app["instances"]:
            assert isinstance(inst["agent"], str)
            assert inst["state"] in ("running", "standby", "stopped", "fenced", "failed")
    for t in doc["trust"]:
        assert isinstance(t["site"], str)
        assert t["fingerprint"].startswith("sha256:")
        assert isinstance(t["not_after"], str)


async def test_json_matches_schema_and_truth(mesh: Mesh, invoke: Invoke) -> None:
    tokens = await seed_world(mesh.buckets, mesh.nc)
    result = await invoke("status", "-s", mesh.url, "-o", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    check_schema(doc)

    agents = {a["id"]: a for a in doc["agents"]}
    assert agents["site-a/node-1"]["healthy"] and agents["site-a/node-1"]["in_quorum"]
    assert not agents["site-c/node-1"]["healthy"]  # expired session
    assert not agents["site-c/node-1"]["in_quorum"]

    apps = {a["name"]: a for a in doc["applications"]}
    ledger, web = apps["ledger"], apps["web"]
    assert ledger["holder"] == "site-a/node-1" and ledger["fencing_token"] == tokens["ledger"]
    assert ledger["holder_healthy"] is True
    states = {(i["agent"], i["state"], i["stale"]) for i in ledger["instances"]}
    assert states == {
        ("site-a/node-1", "running", False),
        ("site-b/node-1", "standby", False),
        ("site-c/node-1", "running", True),  # reported by a dead agent
    }
    assert web["trait"] == "stateless" and web["holder"] is None
    assert {(s["site"], s["holder"], s["fencing_token"]) for s in web["slots"]} == {
        ("site-a", "site-a/node-1", tokens["web.site-a"]),
        ("site-b", "site-b/node-1", tokens["web.site-b"]),
    }
    assert doc["trust"][0]["site"] == "site-a"
    assert [s["name"] for s in doc["sites"]] == ["site-a", "site-b", "site-c"]
    assert doc["problems"] == []


async def test_stale_heartbeat_is_unhealthy(mesh: Mesh, invoke: Invoke) -> None:
    """An agent that died without closing its session: alive, but not written for > 2 x ttl.
    The write time is the server's, so the heartbeat is written with a 0.3 s ttl here."""
    await mesh.buckets.state.put("agent.site-a.node-9", heartbeat("site-a", "node-9", ttl=0.3))

    async def unhealthy() -> bool:
        result = await invoke("status", "-s", mesh.url, "-o", "json")
        return json.loads(result.stdout)["agents"][0]["healthy"] is False

    await eventually(unhealthy, timeout=10, what="the silent agent to turn unhealthy")  # type: ignore[arg-type]


async def test_marks_and_handover_are_shown(mesh: Mesh, invoke: Invoke) -> None:
    await seed_world(mesh.buckets, mesh.nc)
    await mesh.buckets.state.put("drain.site-b", b'{"kind":"drain","site":"site-b","by":"ops"}')
    await mesh.buckets.state.put("fence.web", b"not even json")  # still a mark
    await write_claim(
        mesh.nc, lease_family("ledger"), "site-a/node-1", 101, ClaimState.HANDOVER, "site-b"
    )
    doc = json.loads((await invoke("status", "-s", mesh.url, "-o", "json")).stdout)
    sites = {s["name"]: s for s in doc["sites"]}
    assert sites["site-b"]["drained"] and sites["site-b"]["drain"]["by"] == "ops"
    assert not sites["site-a"]["drained"]
    apps = {a["name"]: a for a in doc["applications"]}
    assert apps["web"]["fenced"] and not apps["ledger"]["fenced"]
    assert apps["ledger"]["lease_state"] == "handover"
    assert apps["ledger"]["handover_to"] == "site-b"

    table = (await invoke("status", "-s", mesh.url)).stdout
    assert "web (fenced)" in table and "yes (by ops)" in table
    assert "site-a/node-1 -> site-b" in table


async def test_tables(mesh: Mesh, invoke: Invoke) -> None:
    await seed_world(mesh.buckets, mesh.nc)
    result = await invoke("status", "-s", mesh.url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for header in ("SITE", "AGENT", "APPLICATION", "TRUSTED SITE"):
        assert header in out
    assert "site-a/node-1=running" in out and "site-c/node-1=running?" in out
    assert "\x1b[" not in out  # no colours into a pipe
    assert all(line == line.rstrip() for line in out.splitlines())
    wide = (await invoke("status", "-s", mesh.url, "-o", "wide")).stdout
    assert "EPOCH" in wide and "site-a,site-b,site-c" in wide
    assert ca_fingerprint("site-a") in wide and "unverified" in wide


async def test_empty_mesh_and_problems(mesh: Mesh, invoke: Invoke) -> None:
    doc = json.loads((await invoke("status", "-s", mesh.url, "-o", "json")).stdout)
    assert doc["agents"] == doc["applications"] == doc["trust"] == []
    await mesh.buckets.state.put("app.broken", b"{}")
    await mesh.buckets.state.put("agent.site-a.x", b"[]")
    await write_claim(mesh.nc, lease_family("ghost"), "site-a/x", 7)
    doc = json.loads((await invoke("status", "-s", mesh.url, "-o", "json")).stdout)
    assert len(doc["problems"]) == 3, doc["problems"]
    assert "no trusted site CAs" in (await invoke("status", "-s", mesh.url)).stdout


async def test_unreachable_mesh_fails_with_one_line(invoke: Invoke) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = await invoke("status", "-s", url, "--timeout", "1s")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "mesh unreachable at " + url in result.stderr
    assert time.monotonic() - started < 5


async def test_uninitialised_mesh_and_bad_options(nats_server: Any, invoke: Invoke) -> None:
    result = await invoke("status", "-s", nats_server.url)
    assert result.exit_code == 1 and "mesh not initialised" in result.stderr
    bad = await invoke("status", "-s", nats_server.url, "--timeout", "soon")
    assert bad.exit_code == 2 and "--timeout" in bad.stderr


async def test_watch_shows_a_change_within_one_second(mesh: Mesh) -> None:
    await seed_world(mesh.buckets, mesh.nc)
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "agent.cli", "status", "-s", mesh.url, "-o", "json", "--watch"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        limit=1 << 20,
    )
    assert proc.stdout is not None
    stdout = proc.stdout

    async def until(predicate: Callable[[dict[str, Any]], bool], within: float) -> None:
        """Read JSON lines until one satisfies ``predicate``; fail after ``within`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            line = await asyncio.wait_for(stdout.readline(), max(0.001, deadline - loop.time()))
            assert line, "status --watch exited"
            if predicate(json.loads(line)):
                return

    def site_b_drained(doc: dict[str, Any]) -> bool:
        return bool(doc["sites"][1]["drained"])

    try:
        await until(lambda doc: not site_b_drained(doc), within=15)  # the first snapshot
        await mesh.buckets.state.put("drain.site-b", b'{"kind":"drain","site":"site-b"}')
        await until(site_b_drained, within=1.0)
        await mesh.buckets.state.delete("drain.site-b")
        await until(lambda doc: not site_b_drained(doc), within=1.0)
    finally:
        proc.terminate()
        await proc.wait()
