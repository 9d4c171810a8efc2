"""deploy/nats/accounts.conf on a real nats-server: the agent user may not send commands,
the operator may, and the viewer can read status but not write or command."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import nats
import pytest
from click.testing import CliRunner, Result

from agent.cli import cli
from agent.commands import CommandServer
from tests.commands.helpers import connect, seed_world
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

CONF = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "accounts.conf"
PASSWORDS = {"agent": "agent-secret", "operator": "operator-secret", "viewer": "viewer-secret"}


@pytest.fixture
async def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[NatsNode]:
    for user, password in PASSWORDS.items():
        monkeypatch.setenv(f"HARMONY_NATS_{user.upper()}_PASSWORD", password)
    node = NatsNode(name="secured", workdir=tmp_path / "nats", extra=CONF.read_text())
    node.start()
    try:
        await node.wait_ready()
        yield node
    finally:
        node.stop()


def url(node: NatsNode, user: str) -> str:
    return f"nats://{user}:{PASSWORDS[user]}@{node.host}:{node.port}"


async def test_agent_user_cannot_command_but_operator_can(secured: NatsNode) -> None:
    nc, buckets = await connect(url(secured, "agent"))  # the agent bootstraps the buckets
    await seed_world(buckets, nc)
    server = CommandServer(nc, buckets.state, site="site-a", node="node-1")
    await server.start()

    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    rogue = await nats.connect(servers=[url(secured, "agent")], error_cb=on_error)
    operator = await nats.connect(servers=[url(secured, "operator")])
    try:
        body = json.dumps({"site": "site-b"}).encode()
        with pytest.raises(nats.errors.TimeoutError):
            await rogue.request("harmony.cmd.site-a.node-1.drain", body, timeout=1)
        await eventually(
            lambda: any("permissions violation" in e.lower() for e in errors),
            what="the server to refuse the agent user's command publish",
        )
        assert server.answered == 0
        assert rogue.is_connected  # refused, not disconnected

        reply = json.loads(
            (await operator.request("harmony.cmd.site-a.node-1.drain", body, timeout=5)).data
        )
        assert reply["ok"] and reply["changed"] is True
        assert server.answered == 1
    finally:
        await server.stop()
        for conn in (rogue, operator, nc):
            await conn.close()


async def test_operator_applies_and_viewer_only_reads(secured: NatsNode, tmp_path: Path) -> None:
    nc, buckets = await connect(url(secured, "agent"))
    await seed_world(buckets, nc)
    await nc.close()
    runner = CliRunner()

    def invoke(*args: str) -> Awaitable[Result]:
        return asyncio.to_thread(runner.invoke, cli, list(args))

    viewer = await invoke("status", "-o", "json", "-s", url(secured, "viewer"))
    assert viewer.exit_code == 0, viewer.output
    doc = json.loads(viewer.stdout)
    assert {a["id"] for a in doc["agents"]} == {"site-a/node-1", "site-b/node-1", "site-c/node-1"}

    apps = tmp_path / "apps.yaml"
    from tests.commands.helpers import APPS_YAML

    apps.write_text(APPS_YAML.replace('"1000"', '"2000"'))
    refused = await invoke(
        "apply", "-f", str(apps), "-s", url(secured, "viewer"), "--timeout", "2s"
    )
    assert refused.exit_code == 1
    assert "permissions violation for publish" in refused.stderr.lower()
    assert "$kv.harmony-state.app.ledger" in refused.stderr.lower()
    allowed = await invoke("apply", "-f", str(apps), "-s", url(secured, "operator"))
    assert allowed.exit_code == 0, allowed.output
    assert "application/ledger updated" in allowed.stdout


async def test_wrong_password_is_one_line_without_the_password(secured: NatsNode) -> None:
    runner = CliRunner()
    bad = f"nats://viewer:not-the-password@{secured.host}:{secured.port}"
    result = await asyncio.to_thread(runner.invoke, cli, ["status", "-s", bad])
    assert result.exit_code == 1
    assert "Authorization Violation" in result.stderr
    assert "not-the-password" not in result.stderr and "viewer:***@" in result.stderr
