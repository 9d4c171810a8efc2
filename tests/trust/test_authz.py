"""The role permissions of ``mesh.authz`` on a real nats-server: each role can do its whole
job with nothing more (no permission error anywhere), a few things it must not do are
refused, and ``deploy/nats/accounts.conf`` is exactly what the generator renders.

Identities here log in with passwords (the same permission sets as the certificate users)
so the test runs on loopback in a second; the netns test does it with certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from click.testing import CliRunner
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import KeyWrongLastSequenceError

from agent.cli import cli
from mesh.authz import (
    EXAMPLE_COMMAND,
    AuthzError,
    MeshNames,
    Roles,
    User,
    admin_permissions,
    agent_identity,
    agent_inbox_prefix,
    agent_permissions,
    deploy_example,
    operator_permissions,
    render_accounts,
    trust_admin_permissions,
    user_inbox_prefix,
    viewer_permissions,
)
from mesh.embedded import find_nats_server
from mesh.watch import Change, KvWatch
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "accounts.conf"
NAMES = MeshNames(stores=("site-a", "site-b"))


def test_deploy_accounts_conf_is_generated() -> None:
    assert DEPLOY.read_text() == deploy_example(), (
        "deploy/nats/accounts.conf is stale: regenerate it with\n  " + EXAMPLE_COMMAND
    )
    printed = CliRunner().invoke(cli, EXAMPLE_COMMAND.split()[1:])
    assert printed.exit_code == 0, printed.output
    assert deploy_example().endswith(printed.output)


def test_deploy_accounts_conf_is_valid_nats_config(tmp_path: Path) -> None:
    (tmp_path / "accounts.conf").write_text(DEPLOY.read_text())
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:0"\njetstream {{ store_dir: "{tmp_path}/js" }}\n'
        "include ./accounts.conf\n"
    )
    check = subprocess.run(
        [find_nats_server(), "-t", "-c", str(conf)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_names_that_cannot_be_subjects_are_refused() -> None:
    with pytest.raises(AuthzError, match="site"):
        agent_identity("site.a", "n1")
    with pytest.raises(AuthzError, match="reserved"):
        agent_identity("operators", "n1")
    with pytest.raises(AuthzError, match="one role"):
        Roles(site="a", operators=("x",), viewers=("x",)).users(NAMES)
    assert agent_identity("site-a", "n1") == "CN=n1,OU=site-a,O=harmony"
    assert agent_inbox_prefix("site-a", "n1") == "_INBOX_site-a_n1"


# --- a server with every role ----------------------------------------------------------------

PASSWORDS = {
    "agent": "agent-pw",
    "other-agent": "other-pw",
    "operator": "operator-pw",
    "viewer": "viewer-pw",
    "trust-admin": "trust-pw",
    "admin": "admin-pw",
}
INBOX = {
    "agent": agent_inbox_prefix("site-a", "n1"),
    "other-agent": agent_inbox_prefix("site-b", "n1"),
    "operator": user_inbox_prefix("ops-1"),
    "viewer": user_inbox_prefix("view-1"),
    "trust-admin": user_inbox_prefix("ta-1"),
    "admin": user_inbox_prefix("adm-1"),
}


@pytest.fixture
async def roles_server(tmp_path: Path) -> AsyncIterator[NatsNode]:
    users = (
        User("agent", agent_permissions(NAMES, "site-a", "n1"), password=PASSWORDS["agent"]),
        User(
            "other-agent",
            agent_permissions(NAMES, "site-b", "n1"),
            password=PASSWORDS["other-agent"],
        ),
        User("operator", operator_permissions(NAMES, "ops-1"), password=PASSWORDS["operator"]),
        User("viewer", viewer_permissions(NAMES, "view-1"), password=PASSWORDS["viewer"]),
        User("trust-admin", trust_admin_permissions("ta-1"), password=PASSWORDS["trust-admin"]),
        User("admin", admin_permissions("adm-1"), password=PASSWORDS["admin"]),
    )
    node = NatsNode(
        name="roles",
        workdir=tmp_path / "nats",
        extra=render_accounts(NAMES, Roles(site="site-a", extra_users=users)),
    )
    node.start()
    try:
        await node.wait_ready()
        yield node
    finally:
        node.stop()


async def connect(node: NatsNode, role: str, errors: list[str]) -> Client:
    async def on_error(exc: Exception) -> None:
        errors.append(f"{role}: {exc}")

    return await nats.connect(
        servers=[node.url],
        user=role,
        password=PASSWORDS[role],
        inbox_prefix=INBOX[role],
        error_cb=on_error,
    )


async def test_every_role_does_its_job_and_no_more(roles_server: NatsNode) -> None:
    errors: list[str] = []
    admin = await connect(roles_server, "admin", errors)
    agent = await connect(roles_server, "agent", errors)
    operator = await connect(roles_server, "operator", errors)
    viewer = await connect(roles_server, "viewer", errors)
    trust_admin = await connect(roles_server, "trust-admin", errors)
    try:
        # admin: creates everything (the only JetStream administrator).
        ajs = admin.jetstream(timeout=5)
        for bucket in ("harmony-state", "harmony-trust", "harmony-leases-site-a"):
            await ajs.create_key_value(KeyValueConfig(bucket=bucket, history=5))
        await ajs.create_key_value(
            KeyValueConfig(bucket="harmony-leases-site-b", history=5, direct=True)
        )
        await ajs.add_stream(StreamConfig(name="harmony-events", subjects=["harmony.events.>"]))
        await (await ajs.key_value("harmony-state")).put("mesh", b'{"stores":["site-a"]}')

        # operator: writes apps and marks, commands, audits, reads.
        ojs = operator.jetstream(timeout=5)
        ostate = await ojs.key_value("harmony-state")
        await ostate.put("app.ledger", b'{"name":"ledger"}')
        await ostate.put("drain.site-b", b"{}")
        await ostate.put("fence.ledger", b"{}")
        await operator.publish("harmony.audit.ops-1.drain", b"{}")

        # trust-admin: writes ca.* (signed entries; the signature is checked by agents).
        tkv = await trust_admin.jetstream(timeout=5).key_value("harmony-trust")
        await tkv.put("ca.site-a", b"{}")

        # agent: everything an agent does, on its own keys.
        js = agent.jetstream(timeout=5)
        state = await js.key_value("harmony-state")
        trust = await js.key_value("harmony-trust")
        lease_a = await js.key_value("harmony-leases-site-a")
        lease_b = await js.key_value("harmony-leases-site-b")
        for kv in (lease_a, lease_b):
            rev = await kv.create("sess.site-a.n1.live", b"alive")
            await kv.update("sess.site-a.n1.live", b"alive2", last=rev)
            with pytest.raises(KeyWrongLastSequenceError):
                await kv.update("sess.site-a.n1.live", b"stale", last=rev)
            await kv.create("sess.site-b.n1.expired.site-a.n1", b"expired-by-me")
            claim = await kv.create("lease.ledger.site-a.n1", b"claim")
            await kv.delete("lease.ledger.site-a.n1", last=claim)
            await kv.create("slot.web.site-a.n1", b"slot")
            assert (await kv.get("sess.site-a.n1.live")).value == b"alive2"  # direct on b
        await state.put("agent.site-a.n1", b"{}")
        await state.put("inst.ledger.site-a.n1", b"{}")
        assert (await state.get("app.ledger")).value == b'{"name":"ledger"}'
        assert (await state.get("mesh")).value
        assert (await trust.get("ca.site-a")).value == b"{}"
        assert "app.ledger" in await state.keys()
        watcher = await state.watch("app.*")
        first = await asyncio.wait_for(watcher.updates(), 5)
        assert first is not None and first.key == "app.ledger"
        await watcher.stop()  # type: ignore[no-untyped-call]
        seen: list[Change] = []
        kvwatch = KvWatch(js, "harmony-state", ">", seen.append, heartbeat=0.5)
        await kvwatch.start()
        await eventually(lambda: any(c.key == "drain.site-b" for c in seen), what="KvWatch")
        await kvwatch.stop()
        ack = await js.publish("harmony.events.site-a.n1.started", b"{}")
        assert ack.seq >= 1

        gossip: list[str] = []

        async def on_gossip(msg: Msg) -> None:
            gossip.append(msg.subject)

        await agent.subscribe("harmony.instances.>", cb=on_gossip)

        async def answer(msg: Msg) -> None:
            await msg.respond(json.dumps({"ok": True, "subject": msg.subject}).encode())

        await agent.subscribe("harmony.status.site-a.n1", cb=answer)
        await agent.subscribe("harmony.cmd.site-a.n1.*", cb=answer)
        await agent.subscribe("harmony.cmd.app.*.*", cb=answer)
        await agent.publish("harmony.instances.site-a.n1", b"[]")
        await agent.flush()
        await eventually(lambda: gossip == ["harmony.instances.site-a.n1"], what="gossip")

        status = await viewer.request("harmony.status.site-a.n1", b"{}", timeout=5)
        assert json.loads(status.data)["ok"]
        cmd = await operator.request("harmony.cmd.site-a.n1.ping", b"{}", timeout=5)
        assert json.loads(cmd.data)["ok"]
        app_cmd = await operator.request("harmony.cmd.app.ledger.failover", b"{}", timeout=5)
        assert json.loads(app_cmd.data)["ok"]

        # viewer: reads with KV watches and gets.
        vstate = await viewer.jetstream(timeout=5).key_value("harmony-state")
        assert (await vstate.get("app.ledger")).value
        vwatch = await vstate.watchall()
        assert await asyncio.wait_for(vwatch.updates(), 5) is not None
        await vwatch.stop()  # type: ignore[no-untyped-call]
        await asyncio.sleep(0)  # let any -ERR arrive before the check below
        await operator.flush()
        await agent.flush()
        await viewer.flush()
        assert errors == [], errors

        # ... and no more: one refusal per role, each from the server.
        async def refused(nc: Client, act: object, subject: str) -> None:
            errors.clear()
            with contextlib.suppress(Exception):  # a refused request gets no answer
                await asyncio.wait_for(act, 0.5)  # type: ignore[arg-type]
            await eventually(
                lambda: any("permissions violation" in e and subject in e for e in errors),
                timeout=5,
                what=f"refusal of {subject}",
            )

        await refused(viewer, vstate.put("app.ledger", b"{}"), "$kv.harmony-state.app.ledger")
        await refused(
            operator,
            (await ojs.key_value("harmony-leases-site-a")).put("lease.ledger.site-a.n1", b"x"),
            "$kv.harmony-leases-site-a.lease.ledger.site-a.n1",
        )
        await refused(operator, ojs.purge_stream("KV_harmony-state"), "stream.purge")
        await refused(trust_admin, tkv._js.purge_stream("KV_harmony-trust"), "stream.purge")
        await refused(agent, state.put("mesh", b"{}"), "$kv.harmony-state.mesh")
        await refused(agent, agent.subscribe("harmony.cmd.site-b.n1.*"), "harmony.cmd.site-b.n1.*")
        await refused(agent, agent.publish("harmony.cmd.site-a.n1.drain", b""), "harmony.cmd")
    finally:
        for nc in (agent, operator, viewer, trust_admin, admin):
            await nc.close()
