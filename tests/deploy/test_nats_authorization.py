"""The generated NATS authorization on a real nats-server: certificates map to per-agent users
(their e-mail SAN), and an agent may write its own keys only.

The server runs the generated configuration of a one-server site, with its listeners moved
to loopback ports and without routes; certificates come from the project's own site CA.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from agent.deploy.nats_conf import render
from agent.deploy.site import SiteSpec, agent_email, nats_config, role_email
from mesh.authz import inbox_prefix_for
from mesh.embedded import find_nats_server
from mesh.trust import SiteCA, cert_pem
from tests.harness.ports import free_port
from tests.harness.wait import eventually

SITE = "paris"
SPEC = SiteSpec(site=SITE, nodes=("n1.example", "n2.example"), nats_replicas=1)
assert not SPEC.clustered


def _client_cert(ca: SiteCA, email: str, directory: Path) -> tuple[Path, Path]:
    """A client certificate like cert-manager's: OU = site, the identity as e-mail SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ca.site),
                    x509.NameAttribute(NameOID.COMMON_NAME, email.split("@", maxsplit=1)[0]),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    crt, pem = directory / f"{email}.crt", directory / f"{email}.key"
    crt.write_bytes(cert_pem(cert))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return crt, pem


class Mesh:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = SiteCA.create(SITE, root / "ca")
        server, key = self.ca.issue("nats-0", ips=["127.0.0.1"])
        (root / "tls.crt").write_bytes(cert_pem(server))
        (root / "tls.key").write_bytes(key)
        (root / "ca.pem").write_bytes(cert_pem(self.ca.cert))
        self.port = free_port()
        self.errors: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = nats_config(SPEC)
        files = {
            "cert_file": str(self.root / "tls.crt"),
            "key_file": str(self.root / "tls.key"),
            "ca_file": str(self.root / "ca.pem"),
        }
        local = dataclasses.replace(
            conf,
            server_name=f"{SITE}-nats-0",
            listen=f"127.0.0.1:{self.port}",
            monitor_listen=f"127.0.0.1:{free_port()}",
            store_dir=str(self.root / "js"),
            pid_file=str(self.root / "nats.pid"),
            tls=dataclasses.replace(conf.tls, **files),
            cluster=None,  # a one-server site: no routes
        )
        path = self.root / "nats.conf"
        path.write_text(render(local))
        log = open(self.root / "nats.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([find_nats_server(), "-c", str(path)], stdout=log, stderr=log)
        log.close()

    async def connect(self, email: str, **kwargs: object) -> Client:
        crt, key = _client_cert(self.ca, email, self.root)
        ctx = ssl.create_default_context(cafile=str(self.root / "ca.pem"))
        ctx.load_cert_chain(str(crt), str(key))

        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        # Each identity may read replies on its own inbox only (mesh.authz).
        kwargs.setdefault("inbox_prefix", inbox_prefix_for(str(crt)) or "_INBOX")
        return await nats.connect(
            f"tls://127.0.0.1:{self.port}",
            tls=ctx,
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=2,
            **kwargs,  # type: ignore[arg-type]
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    mesh = Mesh(tmp_path)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


async def test_agents_write_only_their_own_keys(mesh: Mesh) -> None:
    async def admin_connects() -> Client:
        return await mesh.connect(role_email(SITE, "admin"))

    admin = await eventually(admin_connects, timeout=30, what="nats-server up, admin mapped")
    ajs = admin.jetstream()
    leases = await ajs.create_key_value(KeyValueConfig(bucket=f"harmony-leases-{SITE}"))
    state = await ajs.create_key_value(KeyValueConfig(bucket="harmony-state"))

    n1 = await mesh.connect(agent_email(SITE, "n1"), inbox_prefix=f"_INBOX_{SITE}_n1")
    js = n1.jetstream(timeout=1)
    my_leases = await js.key_value(f"harmony-leases-{SITE}")  # stream info is allowed
    await my_leases.put(f"sess.{SITE}.n1.live", b"{}")
    await my_leases.put(f"lease.ledger.{SITE}.n1", b"{}")
    await my_leases.put(f"sess.{SITE}.n2.expired.{SITE}.n1", b"{}")
    my_state = await js.key_value("harmony-state")
    await my_state.put(f"agent.{SITE}.n1", b"{}")

    lease_bucket = f"harmony-leases-{SITE}"
    forbidden = [
        (my_leases, lease_bucket, f"sess.{SITE}.n2.live"),  # forge another agent's session
        (my_leases, lease_bucket, f"lease.ledger.{SITE}.n2"),  # a lease in another's name
        (my_state, "harmony-state", "app.evil"),  # an Application (arbitrary commands)
        (my_state, "harmony-state", f"drain.{SITE}"),  # a drain mark
        (my_state, "harmony-state", f"agent.{SITE}.n2"),  # another agent's heartbeat
    ]
    for kv, _, key in forbidden:
        with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
            await kv.put(key, b"{}")
    # Another agent's command subject and other users' inboxes cannot be subscribed.
    await n1.subscribe(f"harmony.cmd.{SITE}.n2.*")
    await n1.subscribe("_INBOX.>")
    await n1.flush()

    def refused(subject: str, verb: str) -> bool:
        # nats-py lower-cases the server's -ERR line.
        wanted = f'permissions violation for {verb} to "{subject}"'.lower()
        return any(wanted in e.lower() for e in mesh.errors)

    await eventually(
        lambda: (
            refused(f"harmony.cmd.{SITE}.n2.*", "subscription")
            and refused("_INBOX.>", "subscription")
        ),
        timeout=10,
        what=f"subscription refusals in {mesh.errors}",
    )
    for _, bucket, key in forbidden:
        assert refused(f"$KV.{bucket}.{key}", "publish"), (key, mesh.errors)
    # Nothing moved in the stores; the allowed writes are there.
    assert {k async for k in await _keys(leases)} == {
        f"sess.{SITE}.n1.live",
        f"lease.ledger.{SITE}.n1",
        f"sess.{SITE}.n2.expired.{SITE}.n1",
    }
    assert {k async for k in await _keys(state)} == {f"agent.{SITE}.n1"}
    # A deletion or purge of a stream is JetStream admin: refused for the agent.
    with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError, nats.js.errors.Error)):
        await js.delete_stream(f"KV_harmony-leases-{SITE}")
    assert await ajs.stream_info(f"KV_harmony-leases-{SITE}")
    await n1.close()
    await admin.close()


async def _keys(kv: object) -> AsyncIterator[str]:
    async def gen() -> AsyncIterator[str]:
        for key in await kv.keys():  # type: ignore[attr-defined]
            yield key

    return gen()
