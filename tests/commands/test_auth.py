"""deploy/nats/accounts.conf on a real nats-server with mutual TLS mapping certificates to
users: an agent may not send commands, the operator may; the viewer reads status but may
not write an Application or command; and a refused password never shows in an error."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from click.testing import CliRunner
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig

from agent.cli import cli
from agent.commands import CommandServer
from mesh.authz import inbox_prefix_for
from mesh.trust import SiteCA, cert_pem, write_private
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

CONF = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "accounts.conf"


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.site = SiteCA.create("paris", root / "paris")
        self.people = SiteCA.create("operators", root / "operators")
        self.clients = root / "clients.pem"
        self.clients.write_bytes(cert_pem(self.site.cert) + cert_pem(self.people.cert))
        self.leaf(self.site, "nats", ips=["127.0.0.1"])

    def leaf(self, ca: SiteCA, name: str, **kw: list[str]) -> tuple[Path, Path]:
        cert, key = ca.issue(name, **kw)
        crt, pem = self.root / f"{name}.crt", self.root / f"{name}.key"
        crt.write_bytes(cert_pem(cert) + cert_pem(ca.cert))
        write_private(pem, key)
        return crt, pem

    async def connect(self, node: NatsNode, ca: SiteCA, name: str, **kw: object) -> Client:
        crt, key = self.leaf(ca, name)
        ctx = ssl.create_default_context(cafile=str(self.root / "paris" / "ca.crt"))
        ctx.load_cert_chain(str(crt), str(key))
        return await nats.connect(
            servers=[f"tls://127.0.0.1:{node.port}"],
            tls=ctx,
            inbox_prefix=inbox_prefix_for(str(crt)) or "_INBOX",
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[NatsNode, Pki]]:
    pki = Pki(tmp_path / "pki")
    tls = (
        "tls {\n"
        f'  cert_file: "{pki.root / "nats.crt"}"\n'
        f'  key_file: "{pki.root / "nats.key"}"\n'
        f'  ca_file: "{pki.clients}"\n'
        "  verify_and_map: true\n"
        "}\n"
    )
    node = NatsNode(name="secured", workdir=tmp_path / "nats", extra=tls + CONF.read_text())
    node.start()
    try:
        await node.wait_ready()
        yield node, pki
    finally:
        node.stop()


async def test_agent_identity_cannot_command_but_operator_can(
    secured: tuple[NatsNode, Pki],
) -> None:
    node, pki = secured
    admin = await pki.connect(node, pki.people, "admin-1")
    state = await admin.jetstream().create_key_value(KeyValueConfig(bucket="harmony-state"))
    await admin.close()

    agent = await pki.connect(node, pki.site, "n1")
    server = CommandServer(agent, state, site="paris", node="n1")
    await server.start()
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    rogue = await pki.connect(node, pki.site, "n2", error_cb=on_error)
    operator = await pki.connect(node, pki.people, "ops-1")
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await rogue.request("harmony.cmd.paris.n1.ping", b"{}", timeout=1)
        await eventually(
            lambda: any("permissions violation" in e.lower() for e in errors),
            what="the server to refuse the agent's command publish",
        )
        assert server.answered == 0
        assert rogue.is_connected  # refused, not disconnected

        reply = json.loads(
            (await operator.request("harmony.cmd.paris.n1.ping", b"{}", timeout=5)).data
        )
        assert reply["ok"] and reply["verb"] == "ping"
        assert server.answered == 1
    finally:
        await server.stop()
        for conn in (rogue, operator, agent):
            await conn.close()


async def test_operator_writes_apps_viewer_only_reads(secured: tuple[NatsNode, Pki]) -> None:
    node, pki = secured
    admin = await pki.connect(node, pki.people, "admin-1")
    await admin.jetstream().create_key_value(KeyValueConfig(bucket="harmony-state"))
    await admin.close()
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    agent = await pki.connect(node, pki.site, "n1")
    viewer = await pki.connect(node, pki.people, "viewer-1", error_cb=on_error)
    operator = await pki.connect(node, pki.people, "ops-1")
    try:

        async def status(msg: Msg) -> None:
            await msg.respond(b'{"ok": true}')

        await agent.subscribe("harmony.status.paris.n1", cb=status)
        await agent.flush()

        async def answered() -> Msg:
            # The agent's interest reaches the viewer's account a moment after its flush
            # (seen under load: "no responders"); asking again is what a CLI user does.
            return await viewer.request("harmony.status.paris.n1", b"{}", timeout=5)

        reply = await eventually(answered, timeout=15, what="the agent's status reply")
        assert json.loads(reply.data)["ok"]

        await (await operator.jetstream().key_value("harmony-state")).put("app.ledger", b"{}")
        vkv = await viewer.jetstream(timeout=1).key_value("harmony-state")
        assert (await vkv.get("app.ledger")).value == b"{}"
        with pytest.raises(nats.errors.TimeoutError):
            await vkv.put("app.ledger", b'{"evil": true}')
        await eventually(
            lambda: any("$kv.harmony-state.app.ledger" in e for e in errors),
            what="the viewer's write refused",
        )
        with pytest.raises(nats.errors.TimeoutError):
            await viewer.request("harmony.cmd.paris.n1.drain", b"{}", timeout=0.5)
        await eventually(lambda: any("harmony.cmd" in e for e in errors), what="command refused")
        assert (await vkv.get("app.ledger")).value == b"{}"
    finally:
        for conn in (agent, viewer, operator):
            await conn.close()


async def test_wrong_password_is_one_line_without_the_password(tmp_path: Path) -> None:
    node = NatsNode(
        name="pw",
        workdir=tmp_path / "nats",
        extra='authorization { users: [{user: viewer, password: "the-password"}] }\n',
    )
    node.start()
    try:
        await node.wait_ready()
        runner = CliRunner()
        bad = f"nats://viewer:not-the-password@{node.host}:{node.port}"
        result = await asyncio.to_thread(runner.invoke, cli, ["status", "-s", bad])
        assert result.exit_code == 1
        assert "Authorization Violation" in result.stderr
        assert "not-the-password" not in result.stderr and "viewer:***@" in result.stderr
    finally:
        node.stop()
