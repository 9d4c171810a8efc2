"""A real agent (``harmony-agent run``) with its embedded server over mTLS and per-identity
accounts, wired by the composition root (``agent.daemon`` through ``agent.security``).

It waits for the admin's ``mesh init``, then does its whole job under its own identity
(session and leases in the lease store, heartbeat, instance reports, events, a Process
workload, commands, status, trust sync) with no permission error in the server's log; the
session thread's own connection uses the same TLS identity; operators act with theirs; the
live status carries the security section and no secret; trust entries are recomputed.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import yaml
from click.testing import CliRunner, Result

from agent.cli import cli
from mesh.authz import inbox_prefix_for
from mesh.trust import SiteCA, cert_pem, create_admin_key, fingerprint, write_private
from tests.harness.agents import AgentProcess
from tests.harness.ports import free_port
from tests.harness.wait import eventually

SITE = "site-a"
APP = {
    "apiVersion": "harmony/v1",
    "kind": "Application",
    "metadata": {"name": "ticker"},
    "spec": {
        "trait": "stateful",
        "placement": {"sites": [SITE]},
        "score": {
            "kind": "Process",
            "command": [sys.executable, "-c", "import time; time.sleep(1000)"],
            "stop_timeout": "1s",
        },
    },
}


@dataclass
class Setup:
    agent: AgentProcess
    root: Path
    port: int
    public_key: str

    def as_(self, person: str) -> list[str]:
        return [
            "-s",
            f"tls://127.0.0.1:{self.port}",
            "--tls-ca",
            str(self.root / "site" / "ca.crt"),
            "--tls-cert",
            str(self.root / f"{person}.crt"),
            "--tls-key",
            str(self.root / f"{person}.key"),
        ]

    @property
    def server_log(self) -> str:
        path = self.agent.workdir / "state" / "nats" / "nats-server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def leaf(root: Path, ca: SiteCA, name: str, **kw: list[str]) -> None:
    cert, key = ca.issue(name, **kw)
    (root / f"{name}.crt").write_bytes(cert_pem(cert) + cert_pem(ca.cert))
    write_private(root / f"{name}.key", key)


async def cli_run(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args))


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    root = tmp_path / "pki"
    site, people = SiteCA.create(SITE, root / "site"), SiteCA.create("operators", root / "ops")
    leaf(root, site, "nats", ips=["127.0.0.1"])
    leaf(root, site, "n1")
    for person in ("adm-1", "ops-1", "view-1", "ta-1"):
        leaf(root, people, person)
    (root / "clients.pem").write_bytes(cert_pem(site.cert) + cert_pem(people.cert))
    public_key = create_admin_key(root / "trust-admin")
    (tmp_path / "bundle").mkdir()
    bundle = tmp_path / "bundle" / "ca-bundle.pem"
    bundle.write_bytes(cert_pem(site.cert))
    port = free_port()
    agent = AgentProcess(
        site=SITE,
        node="n1",
        workdir=tmp_path / "agent",
        servers=[f"tls://127.0.0.1:{port}"],
        extra={
            "nats": {
                "embedded": True,
                "listen": f"127.0.0.1:{port}",
                "monitor_listen": f"127.0.0.1:{free_port()}",
                "system_listen": f"127.0.0.1:{free_port()}",
                "tls": {
                    "ca_file": str(root / "site" / "ca.crt"),
                    "cert_file": str(root / "n1.crt"),
                    "key_file": str(root / "n1.key"),
                },
                "server_tls": {
                    "cert_file": str(root / "nats.crt"),
                    "key_file": str(root / "nats.key"),
                    "client_ca_file": str(root / "clients.pem"),
                },
                "accounts": {
                    "operators": ["ops-1"],
                    "viewers": ["view-1"],
                    "trust_admins": ["ta-1"],
                    "admins": ["adm-1"],
                },
            },
            "mesh": {"replicas": 1, "stores": [SITE]},
            "trust": {
                "bundle_file": str(bundle),
                "admin_public_key": public_key,
                "site_ca_file": str(root / "site" / "ca.crt"),
            },
        },
    )
    agent.start()
    try:
        yield Setup(agent, root, port, public_key)
    finally:
        agent.stop()


async def test_the_agent_does_its_whole_job_under_its_own_identity(setup: Setup) -> None:
    agent = setup.agent

    # No mesh yet: the agent waits for the admin (it may not create buckets itself).
    async def initialised() -> bool:
        r = await cli_run("mesh", "init", "--stores", SITE, "--replicas", "1", *setup.as_("adm-1"))
        return r.exit_code == 0

    await eventually(initialised, timeout=30, interval=0.5, what="mesh init by the admin")
    await eventually(agent.ready, timeout=30, what=f"agent ready: {agent.log()}")
    added = await cli_run(
        "trust", "add", str(setup.root / "site" / "ca.crt"),
        "--admin-key", str(setup.root / "trust-admin" / "trust-admin.key"), *setup.as_("ta-1"),
    )  # fmt: skip
    assert added.exit_code == 0, added.output

    app = setup.root / "app.yaml"
    app.write_text(yaml.safe_dump(APP))
    applied = await cli_run("apply", "-f", str(app), *setup.as_("ops-1"))
    assert applied.exit_code == 0, applied.output

    async def status() -> dict[str, object]:
        r = await cli_run("status", "-o", "json", *setup.as_("view-1"))
        assert r.exit_code == 0, r.output
        doc: dict[str, object] = json.loads(r.stdout)
        return doc

    async def running() -> bool:
        doc = await status()
        apps = {a["name"]: a for a in doc["applications"]}  # type: ignore[attr-defined]
        ticker = apps.get("ticker")
        return ticker is not None and [i["state"] for i in ticker["instances"]] == ["running"]

    await eventually(running, timeout=30, interval=0.5, what="ticker running under the agent")
    doc = await status()
    [agent_doc] = doc["agents"]  # type: ignore[misc]
    assert agent_doc["healthy"] and agent_doc["in_quorum"]
    [trust] = doc["trust"]  # type: ignore[misc]
    site_ca = (setup.root / "site" / "ca.crt").read_bytes()
    from cryptography import x509

    assert trust["fingerprint"] == fingerprint(x509.load_pem_x509_certificate(site_ca))

    # The live status: a viewer may read it; it has the security section and no secret.
    ctx = ssl.create_default_context(cafile=str(setup.root / "site" / "ca.crt"))
    ctx.load_cert_chain(str(setup.root / "view-1.crt"), str(setup.root / "view-1.key"))
    viewer = await nats.connect(
        f"tls://127.0.0.1:{setup.port}",
        tls=ctx,
        inbox_prefix=inbox_prefix_for(str(setup.root / "view-1.crt")) or "_INBOX",
    )
    try:
        reply = await viewer.request("harmony.status.site-a.n1", b"{}", timeout=5)
    finally:
        await viewer.close()
    live = json.loads(reply.data)
    security = live["security"]
    assert security["trust"]["synced"] and list(security["trust"]["sites"]) == [SITE]
    assert set(security["certificates"]) >= {"agent", "server", "site-ca", "bundle"}
    conf = (agent.workdir / "state" / "nats" / "nats-server.conf").read_text()
    password = conf.split('password: "', 1)[1].split('"', 1)[0]
    assert len(password) > 20
    assert password not in reply.data.decode() and password not in agent.log(10**7)
    assert "PRIVATE KEY" not in reply.data.decode()

    # Operator verbs under the operator's identity; the agent follows the mark.
    fenced = await cli_run("cmd", "fence", "ticker", *setup.as_("ops-1"))
    assert fenced.exit_code == 0, fenced.output

    async def stopped() -> bool:
        doc = await status()
        [ticker] = doc["applications"]  # type: ignore[misc]
        return [i["state"] for i in ticker["instances"]] in (["fenced"], ["stopped"], [])

    await eventually(stopped, timeout=30, interval=0.5, what="ticker stopped by the fence")
    pinged = await cli_run("cmd", "ping", *setup.as_("ops-1"))
    assert pinged.exit_code == 0 and "site-a/n1" in pinged.stdout, pinged.output

    # Nothing the agent (or anyone here) did was refused by the server.
    assert "Violation" not in setup.server_log, [
        line for line in setup.server_log.splitlines() if "Violation" in line
    ][:5]
    assert agent.stop() == 0
