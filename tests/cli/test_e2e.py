"""End to end: three real agents (one per site) on one nats-server, driven only through the
CLI: apply, status, drain, failover, fence, resume. ``status -o json`` must tell the truth
the agents and the leases agree on."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli.conftest import Invoke
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

SITES = ("site-a", "site-b", "site-c")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]


def apps_yaml() -> str:
    score = {"kind": "Process", "command": SLEEPER, "stop_timeout": "1s"}
    docs = [
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": "ledger"},
            "spec": {"trait": "stateful", "placement": {"sites": list(SITES)}, "score": score},
        },
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": "web"},
            "spec": {
                "trait": "stateless",
                "failover": {"strategy": "SplitBrainAllowed"},
                "placement": {"sites": ["site-a", "site-b"]},
                "score": score,
            },
        },
    ]
    return yaml.safe_dump_all(docs)


@pytest.fixture
async def agents(nats_server: NatsNode, tmp_path: Path) -> AsyncIterator[list[AgentProcess]]:
    procs = [
        AgentProcess(site=s, node="n1", workdir=tmp_path / s, servers=[nats_server.url])
        for s in SITES
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            await eventually(p.ready, timeout=30, what=f"{p.agent_id} ready")
        yield procs
    finally:
        for p in procs:
            p.stop()


class Cli:
    """The CLI against one mesh, with the helpers the scenarios read status through."""

    def __init__(self, url: str, invoke: Invoke) -> None:
        self.url = url
        self.invoke = invoke

    async def status(self) -> dict[str, Any]:
        result = await self.invoke("status", "-s", self.url, "-o", "json")
        assert result.exit_code == 0, result.output
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    async def cmd(self, *args: str) -> str:
        result = await self.invoke("cmd", "-s", self.url, *args)
        assert result.exit_code == 0, result.output
        return str(result.stdout)

    async def settled(self, *, not_on: str | None = None) -> dict[str, Any] | None:
        """ledger runs once, on its lease holder, with the lease's token; web runs on
        site-a and site-b (minus ``not_on``); every agent healthy and in quorum."""
        doc = await self.status()
        ledger, web = app(doc, "ledger"), app(doc, "web")
        live = running(doc, "ledger")
        if len(live) != 1 or ledger["holder"] is None or ledger["holder"] != live[0]["agent"]:
            return None
        if live[0]["token"] != ledger["fencing_token"]:
            return None
        if ledger["holder"].startswith(f"{not_on}/"):
            return None
        web_sites = {i["agent"].split("/")[0] for i in running(doc, "web")}
        expected = {"site-a", "site-b"} - {not_on}
        if web_sites != expected or {s["site"] for s in web["slots"]} < expected:
            return None
        if not all(a["healthy"] and a["in_quorum"] for a in doc["agents"]):
            return None
        return doc

    async def wait_settled(self, what: str, *, not_on: str | None = None) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = await eventually(
                lambda: self.settled(not_on=not_on), timeout=30, interval=0.3, what=what
            )
        except AssertionError:
            print(json.dumps(await self.status(), indent=1))  # shown by pytest on failure
            raise
        return doc


def app(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for a in doc["applications"] if a["name"] == name)


def running(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [i for i in app(doc, name)["instances"] if i["state"] == "running"]


@pytest.fixture
async def deployed(nats_server: NatsNode, agents: list[AgentProcess], invoke: Invoke) -> Cli:
    cli = Cli(nats_server.url, invoke)
    applied = await invoke("apply", "-f", "-", "-s", cli.url, input=apps_yaml())
    assert applied.exit_code == 0, applied.output
    await cli.wait_settled("both applications running")
    return cli


async def test_drain_fence_resume_undrain(deployed: Cli) -> None:
    cli = deployed
    doc = await cli.wait_settled("both applications running")
    holder_site = app(doc, "ledger")["holder"].split("/")[0]
    first_token = app(doc, "ledger")["fencing_token"]

    # Drain the holder's site: ledger moves, web keeps only the other site, the mark shows.
    assert "drained" in await cli.cmd("drain", holder_site, "--reason", "e2e")
    doc = await cli.wait_settled("the drain to move ledger", not_on=holder_site)
    assert {s["name"]: s["drained"] for s in doc["sites"]}[holder_site] is True
    assert app(doc, "ledger")["fencing_token"] > first_token

    # Fence: stopped everywhere and held stopped; resume brings it back.
    assert "fenced" in await cli.cmd("fence", "ledger")

    async def fenced() -> bool:
        d = await cli.status()
        states = {i["state"] for i in app(d, "ledger")["instances"]}
        return bool(app(d, "ledger")["fenced"]) and "running" not in states

    await eventually(fenced, timeout=30, interval=0.3, what="ledger fenced everywhere")
    assert "resumed" in await cli.cmd("resume", "ledger")
    await cli.wait_settled("ledger resumed", not_on=holder_site)

    assert "undrained" in await cli.cmd("undrain", holder_site)
    await cli.wait_settled("web back on every site")


async def test_planned_failover(deployed: Cli) -> None:
    cli = deployed
    doc = await cli.wait_settled("both applications running")
    holder = app(doc, "ledger")["holder"]
    target = next(s for s in SITES if not holder.startswith(f"{s}/"))
    out = await cli.cmd("failover", "ledger", "--to", target)
    assert f"served by {holder}" in out

    async def moved() -> bool:
        d = await cli.settled()
        return d is not None and app(d, "ledger")["holder"] == f"{target}/n1"

    await eventually(moved, timeout=30, interval=0.3, what=f"failover to {target}")
    doc = await cli.status()
    await _view_shows(cli.url, "app.ledger", f"{target}/n1", app(doc, "ledger"))

    async def pid_shown() -> bool:
        live = running(await cli.status(), "ledger")
        return len(live) == 1 and isinstance(live[0].get("pid"), int)

    await eventually(pid_shown, timeout=10, what="the running instance's pid in status")


async def _view_shows(url: str, key: str, holder: str, ledger: dict[str, Any]) -> None:
    """CONTRACT section 7: ``harmony-leases`` ``app.<name>`` names the holder and token
    that ``status`` reads from the lease stores (published by the holder, mesh/mirror.py)."""
    import nats

    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("harmony-leases")

        async def shows() -> dict[str, Any] | None:
            try:
                value: dict[str, Any] = json.loads((await kv.get(key)).value or b"")
            except nats.js.errors.KeyNotFoundError:
                return None
            return value if value.get("holder") == holder else None

        value = await eventually(shows, timeout=15, what=f"{key} in harmony-leases")
        assert value["token"] == ledger["fencing_token"] and value["state"] == "held", value
    finally:
        await nc.close()
