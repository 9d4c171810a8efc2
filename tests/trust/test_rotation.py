"""Rotation without restarts (issue 12 item 3), with leaves valid for a few seconds.

A real embedded nats-server (mTLS, this site's accounts), the agent's main connection and
its session thread on its own connection built from the same options (as the daemon does);
the renewer re-issues both leaves past 2/3 of their life, reloads the server and refreshes
the client's TLS context. A fresh TLS handshake sees the server's new serial, both
connections present the agent's new certificate after a reconnection, the session never
ends, and ``harmony_cert_expiry_seconds`` follows the renewed certificates.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from click.testing import CliRunner
from cryptography import x509
from prometheus_client import REGISTRY

from agent.cli import cli
from agent.config import AgentConfig
from agent.security import SiteSecurity, connection_options, embedded_spec, system_password
from mesh.bootstrap import ensure_mesh
from mesh.clock import boottime
from mesh.connection import MeshConnection
from mesh.embedded import EmbeddedServer
from mesh.evict import cert_sha256, connections
from mesh.rotation import leaf_of
from mesh.session import SessionThread
from mesh.trust import SiteCA, cert_pem, write_private
from tests.harness.ports import free_port
from tests.harness.wait import eventually

LIFE = datetime.timedelta(seconds=8)


def write_leaf(ca: SiteCA, name: str, out: Path, life: datetime.timedelta, **kw: Any) -> Path:
    cert, key = ca.issue(name, validity=life, **kw)
    (out / f"{name}.crt").write_bytes(cert_pem(cert) + cert_pem(ca.cert))
    write_private(out / f"{name}.key", key)
    return out / f"{name}.crt"


def _serial(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.makefile("rb").readline()  # INFO in the clear, then TLS
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def server_serial(port: int) -> int:
    """A fresh TLS handshake with the client port: the serial the server presents now.
    (A blocking socket in a thread: see mesh.evict.route_certificate.)"""
    return await asyncio.to_thread(_serial, port)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[SiteSecurity, MeshConnection, int]]:
    ca = SiteCA.create("site-a", tmp_path / "ca")
    people = SiteCA.create("operators", tmp_path / "ops-ca")
    tls = tmp_path / "tls"
    tls.mkdir()
    write_leaf(ca, "nats", tls, LIFE, ips=["127.0.0.1"])
    write_leaf(ca, "n1", tls, LIFE)
    write_leaf(people, "adm-1", tls, datetime.timedelta(days=1))
    clients = tls / "clients.pem"
    clients.write_bytes(cert_pem(ca.cert) + cert_pem(people.cert))
    port, monitor = free_port(), free_port()
    config = AgentConfig(
        site="site-a",
        node="n1",
        state_dir=tmp_path / "state",
        nats={
            "embedded": True,
            "servers": [f"tls://127.0.0.1:{port}"],
            "listen": f"127.0.0.1:{port}",
            "monitor_listen": f"127.0.0.1:{monitor}",
            "system_listen": f"127.0.0.1:{free_port()}",
            "tls": {
                "ca_file": tmp_path / "ca" / "ca.crt",
                "cert_file": tls / "n1.crt",
                "key_file": tls / "n1.key",
            },
            "server_tls": {
                "cert_file": tls / "nats.crt",
                "key_file": tls / "nats.key",
                "client_ca_file": clients,
            },
            "accounts": {"stores": ["site-a"], "admins": ["adm-1"]},
        },
        trust={"ca_dir": tmp_path / "ca", "site_ca_file": tmp_path / "ca" / "ca.crt"},
        lease={"ttl": "3s"},
    )
    password = system_password()
    embedded = EmbeddedServer(embedded_spec(config, password), tmp_path / "nats" / "nats.conf")
    conn = MeshConnection(connection_options(config))
    security = SiteSecurity(config, connection=conn, embedded=embedded, system_password=password)
    server = asyncio.create_task(embedded.run())
    try:
        await embedded.wait_started()
        await asyncio.wait_for(conn.connect(), 20)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.crt"))
        ctx.load_cert_chain(str(tls / "adm-1.crt"), str(tls / "adm-1.key"))
        admin = await nats.connect(
            servers=[f"tls://127.0.0.1:{port}"], tls=ctx, inbox_prefix="_INBOX_user.adm-1"
        )
        await ensure_mesh(admin.jetstream(), 1, stores=["site-a"])
        await admin.close()
        yield security, conn, port
    finally:
        await conn.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def test_leaves_renewed_and_served_without_restart(
    secured: tuple[SiteSecurity, MeshConnection, int],
) -> None:
    security, conn, port = secured
    cfg = security.config
    assert cfg.nats.server_tls is not None and cfg.nats.tls is not None
    server_file, agent_file = cfg.nats.server_tls.cert_file, cfg.nats.tls.cert_file
    assert agent_file is not None
    first_server, first_agent = leaf_of(server_file), leaf_of(agent_file)
    assert await server_serial(port) == first_server.serial_number

    extra: list[MeshConnection] = []

    async def session_connection() -> nats.aio.client.Client:
        """What the daemon gives its session thread: its own connection, same options."""
        own = MeshConnection(conn.options)
        await own.connect()
        extra.append(own)
        return own.nc

    session = SessionThread(session_connection, ["site-a"], "site-a", "n1", ttl=3.0, margin=0.3)
    await session.start()
    epoch = session.view().epoch("site-a")
    assert epoch and session.view().valid(boottime())
    pid = security.embedded.process.pid  # type: ignore[union-attr]
    tasks = [asyncio.create_task(security.renew_forever())]
    try:
        # Two generations each: the renewed leaves are renewed again in their turn.
        await eventually(
            lambda: (
                sum(r["cert"] == "server" for r in security.renewals) >= 2
                and sum(r["cert"] == "agent" for r in security.renewals) >= 2
            ),
            timeout=30,
            what="two renewals of each leaf",
        )
        now = datetime.datetime.now(datetime.UTC)
        assert now > first_server.not_valid_after_utc, "the first leaves have expired by now"
        renewed = leaf_of(server_file)
        assert renewed.serial_number != first_server.serial_number
        # The running server (same process) serves the renewed certificate.
        assert security.embedded.process.pid == pid  # type: ignore[union-attr]
        await eventually(
            lambda: server_serial(port),
            what="a handshake",
        )
        serial = await server_serial(port)
        assert serial == leaf_of(server_file).serial_number, "server serves the new leaf"

        # Both connections reconnect with the renewed certificate; the session is untouched.
        assert conn.tls_refreshes >= 1
        await conn.nc.force_reconnect()
        [own] = extra
        loop = session._loop
        assert loop is not None
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(own.nc.force_reconnect(), loop))
        await eventually(lambda: conn.connected and own.connected, what="reconnected")
        agent_now = leaf_of(agent_file)
        assert agent_now.serial_number != first_agent.serial_number
        base = f"http://{cfg.nats.monitor_listen}"

        async def presented() -> bool:
            conns = await connections(base)
            shas = [c["tls_peer_certs"][0]["cert_sha256"] for c in conns if c.get("tls_peer_certs")]
            return shas.count(cert_sha256(leaf_of(agent_file))) == 2

        await eventually(presented, what="the renewed agent certificate on both connections")
        assert own.tls_refreshes >= 1  # refreshed on its own disconnect, in its own thread
        await eventually(lambda: session.view().valid(boottime()), what="renewing")
        assert session.view().epoch("site-a") == epoch and session.alive()

        # The expiry gauge follows the renewed certificates.
        security.update_expiry()
        server_left = REGISTRY.get_sample_value("harmony_cert_expiry_seconds", {"cert": "server"})
        expected = leaf_of(server_file).not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert server_left is not None and abs(server_left - expected.total_seconds()) < 2
        ca_left = REGISTRY.get_sample_value("harmony_cert_expiry_seconds", {"cert": "site-ca"})
        assert ca_left is not None and ca_left > 9 * 365 * 86400
        warnings = security.warnings()
        assert any(w.startswith("server: expires in") for w in warnings), warnings
        assert not any(w.startswith("site-ca") for w in warnings), warnings
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()


def test_no_ca_key_no_renewal_but_a_reason(tmp_path: Path) -> None:
    ca = SiteCA.create("site-a", tmp_path / "ca")
    tls = tmp_path / "tls"
    tls.mkdir()
    write_leaf(ca, "n1", tls, datetime.timedelta(seconds=1))
    config = AgentConfig(
        site="site-a",
        node="n1",
        state_dir=tmp_path / "state",
        nats={"tls": {"cert_file": tls / "n1.crt", "key_file": tls / "n1.key"}},
        trust={"ca_dir": tmp_path / "absent"},
    )
    security = SiteSecurity(config)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=5)
    assert security.renew_once(later) == []
    assert security.renew_problem is not None and "no site CA" in security.renew_problem
    assert security.warnings() and security.warnings()[0].startswith("agent: expire")


def test_leaves_renewed_by_root_are_put_to_use(tmp_path: Path) -> None:
    """The shipped unit runs the agent unprivileged: root's `ca renew` (a timer) renews the
    files, and the agent's renewer notices and rebuilds its TLS context."""
    ca = SiteCA.create("site-a", tmp_path / "ca")
    tls = tmp_path / "tls"
    tls.mkdir()
    write_leaf(ca, "n1", tls, datetime.timedelta(days=90))
    config = AgentConfig(
        site="site-a",
        node="n1",
        state_dir=tmp_path / "state",
        nats={"tls": {"cert_file": tls / "n1.crt", "key_file": tls / "n1.key"}},
    )
    conn = MeshConnection(connection_options(config))
    security = SiteSecurity(config, connection=conn)
    assert security.renew_once() == [] and conn.tls_refreshes == 0
    before = leaf_of(tls / "n1.crt")
    args = [str(tls / "n1.crt"), str(tls / "n1.key"), "--dir", str(tmp_path / "ca")]
    not_due = CliRunner().invoke(cli, ["ca", "renew", *args])
    assert not_due.exit_code == 0 and "not due" in not_due.output
    assert leaf_of(tls / "n1.crt").serial_number == before.serial_number
    renewed = CliRunner().invoke(cli, ["ca", "renew", *args, "--force"])
    assert renewed.exit_code == 0, renewed.output
    after = leaf_of(tls / "n1.crt")
    assert after.serial_number != before.serial_number and after.subject == before.subject
    assert (tls / "n1.key").stat().st_mode & 0o077 == 0
    assert security.renew_once() == [] and conn.tls_refreshes == 1
