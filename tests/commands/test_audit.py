"""Audited operators (issue 12 item 4) on a real nats-server with the generated accounts:
certificates mapped to users (``verify_and_map``), permissions from ``mesh.authz``.

A drain by operator ``ops-1`` writes the mark with ops-1's own credentials and produces an
event naming ``ops-1`` that the client could not forge: a client claiming another name
(in its body, or through ``$HARMONY_AUDIT_USER``) is recorded as itself, and the server
refuses it the other operator's audit subject. Agents cannot write marks at all.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from click.testing import CliRunner, Result
from nats.aio.client import Client

from agent.cli import cli
from agent.commands import read_marks
from mesh.authz import MeshNames, Roles, inbox_prefix_for, render_accounts
from mesh.trust import SiteCA, cert_pem, write_private
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

SITE = "site-a"
APP = """\
apiVersion: harmony/v1
kind: Application
metadata: {name: ledger}
spec:
  trait: stateful
  placement: {sites: [site-a, site-b]}
  score: {kind: Process, command: [sleep, "1000"]}
"""


@dataclass
class Secured:
    node: NatsNode
    root: Path
    site: SiteCA
    people: SiteCA

    def leaf(self, ca: SiteCA, name: str) -> tuple[Path, Path]:
        cert, key = ca.issue(name, ips=["127.0.0.1"] if name == "nats" else [])
        crt, pem = self.root / f"{name}.crt", self.root / f"{name}.key"
        crt.write_bytes(cert_pem(cert) + cert_pem(ca.cert))
        write_private(pem, key)
        return crt, pem

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.node.port}"

    def as_(self, person: str) -> list[str]:
        """CLI options to connect as ``person`` (a certificate of the operators' CA)."""
        crt, key = self.root / f"{person}.crt", self.root / f"{person}.key"
        ca = str(self.root / "site" / "ca.crt")
        return ["-s", self.url, "--tls-ca", ca, "--tls-cert", str(crt), "--tls-key", str(key)]

    async def connect(self, ca: SiteCA, name: str, errors: list[str] | None = None) -> Client:
        crt, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        ctx = ssl.create_default_context(cafile=str(self.root / "site" / "ca.crt"))
        ctx.load_cert_chain(str(crt), str(key))

        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc).lower())

        return await nats.connect(
            servers=[self.url],
            tls=ctx,
            inbox_prefix=inbox_prefix_for(str(crt)) or "_INBOX",
            error_cb=on_error,
            allow_reconnect=False,
        )


@pytest.fixture
async def sec(tmp_path: Path) -> AsyncIterator[Secured]:
    root = tmp_path / "pki"
    site, people = SiteCA.create(SITE, root / "site"), SiteCA.create("operators", root / "ops")
    sec = Secured(NatsNode(name="audit", workdir=tmp_path / "nats"), root, site, people)
    crt, key = sec.leaf(site, "nats")
    sec.leaf(site, "n1")
    for person in ("ops-1", "ops-2", "view-1", "adm-1"):
        sec.leaf(people, person)
    clients = root / "clients.pem"
    clients.write_bytes(cert_pem(site.cert) + cert_pem(people.cert))
    accounts = render_accounts(
        MeshNames(stores=(SITE,)),
        Roles(
            site=SITE,
            agents=("n1",),
            operators=("ops-1", "ops-2"),
            viewers=("view-1",),
            admins=("adm-1",),
        ),
    )
    tls = f'tls {{ cert_file: "{crt}", key_file: "{key}", ca_file: "{clients}"\n'
    tls += "  verify_and_map: true }\n"
    sec.node = NatsNode(
        name="audit", workdir=tmp_path / "nats", tags=(f"site:{SITE}",), extra=tls + accounts
    )
    sec.node.start()
    try:
        await sec.node.wait_ready()
        yield sec
    finally:
        sec.node.stop()


async def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env)


async def audit_records(sec: Secured) -> list[dict[str, object]]:
    shown = await run("events", "-o", "json", *sec.as_("view-1"))
    assert shown.exit_code == 0, shown.output
    records = [json.loads(line) for line in shown.stdout.splitlines()]
    return [r for r in records if str(r["subject"]).startswith("harmony.audit.")]


async def test_a_drain_by_ops_1_is_recorded_as_ops_1_whatever_it_claims(
    sec: Secured, tmp_path: Path
) -> None:
    init = await run("mesh", "init", "--stores", SITE, "--replicas", "1", *sec.as_("adm-1"))
    assert init.exit_code == 0, init.output
    (tmp_path / "app.yaml").write_text(APP)
    applied = await run("apply", "-f", str(tmp_path / "app.yaml"), *sec.as_("ops-1"))
    assert applied.exit_code == 0, applied.output

    # ops-1 drains, while its environment claims to be ops-2: the certificate wins.
    drained = await run(
        "cmd", "drain", "site-b", "--reason", "maintenance", *sec.as_("ops-1"),
        env={"HARMONY_AUDIT_USER": "ops-2"},
    )  # fmt: skip
    assert drained.exit_code == 0, drained.output
    assert drained.stdout.startswith("site site-b drained: ledger moves to other sites")

    # A hand-made client of ops-1 claims ops-2 in the body: recorded as ops-1. Publishing
    # on ops-2's subject is refused by the server and never reaches the stream.
    errors: list[str] = []
    rogue = await sec.connect(sec.people, "ops-1", errors)
    try:
        js = rogue.jetstream(timeout=2)
        forged = {"verb": "drain", "user": "ops-2", "by": "ops-2", "site": "site-c"}
        await js.publish("harmony.audit.ops-1.drain", json.dumps(forged).encode())
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError)):
            await js.publish("harmony.audit.ops-2.drain", json.dumps(forged).encode())
        await eventually(
            lambda: any('publish to "harmony.audit.ops-2.drain"' in e for e in errors),
            what=f"the server refusing ops-2's subject to ops-1 ({errors})",
        )
    finally:
        await rogue.close()

    records = await audit_records(sec)
    verbs = [(r["subject"], r["user"], r.get("claimed_user")) for r in records]
    assert verbs == [
        ("harmony.audit.ops-1.apply", "ops-1", None),
        ("harmony.audit.ops-1.drain", "ops-1", None),
        ("harmony.audit.ops-1.drain", "ops-1", "ops-2"),
    ], verbs
    drain = records[1]
    assert drain["site"] == "site-b" and drain["outcome"] == "ok" and drain["changed"] is True
    assert drain["request_id"] and drain["reason"] == "maintenance"
    assert drain["moves"] == ["ledger"]

    # The mark itself was written by ops-1's credentials and names the same request.
    agent = await sec.connect(sec.site, "n1")
    try:
        state = await agent.jetstream(timeout=2).key_value("harmony-state")
        drains, _ = await read_marks(state)
        assert drains["site-b"].by == "ops-1"
        mark = json.loads((await state.get("drain.site-b")).value or b"")
        assert mark["request_id"] == drain["request_id"]

        # An agent may not write marks, nor publish any audit event.
        with pytest.raises(nats.errors.TimeoutError):
            await state.put("drain.site-a", b"{}")
        with pytest.raises(nats.errors.TimeoutError):
            await agent.jetstream(timeout=1).publish("harmony.audit.n1.drain", b"{}")
        assert "site-a" not in (await read_marks(state))[0]
    finally:
        await agent.close()
    assert len(await audit_records(sec)) == 3

    # A viewer cannot drain: the mark write is refused, and said so in one line.
    refused = await run("cmd", "drain", "site-a", "--timeout", "2s", *sec.as_("view-1"))
    assert refused.exit_code == 1 and "write refused" in refused.stderr, refused.output
