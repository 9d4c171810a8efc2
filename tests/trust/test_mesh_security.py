"""Issue 11 on real servers: three sites in network namespaces form the mesh over mTLS only,
nothing in the clear and nothing from an unknown CA gets in, and with site-b's agent
identity every forbidden act is refused by the server (and no stream moves).

Run with ``-s`` to see the table of acts and the servers' refusals (kept for the closing
note of issue 11).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from mesh.authz import EVENTS_STREAM, STATE_BUCKET, TRUST_BUCKET, leases_bucket
from tests.harness.secure import SecureSites, client_context
from tests.harness.wait import eventually

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

MEMBERS = ("site-a", "site-b", "site-c")


@pytest.fixture
async def mesh(tmp_path: Path, require_netns: None) -> AsyncIterator[SecureSites]:
    sites = SecureSites(tmp_path / "sites", rogue="site-x")
    try:
        sites.setup()
        sites.make_pki()
        sites.start_secure()
        for name in MEMBERS:
            await sites.node(name).wait_ready(30)
        await eventually(lambda: full_mesh(sites), timeout=30, what="routes between all sites")
        yield sites
    finally:
        sites.teardown()


def route_peers(sites: SecureSites, site: str) -> set[str]:
    return {r["remote_name"] for r in sites.node(site).varz("routez")["routes"]}  # type: ignore[index, union-attr]


def full_mesh(sites: SecureSites) -> bool:
    return all(route_peers(sites, s) == {f"n-{o}" for o in MEMBERS if o != s} for s in MEMBERS)


def raw_exchange(host: str, port: int, send: bytes, *, info: bool = True) -> tuple[str, str]:
    """Speak plaintext NATS: return (INFO line, whatever the server answers to ``send``).
    Route ports speak TLS first: no INFO to read there (``info=False``)."""
    with socket.create_connection((host, port), timeout=5) as sock:
        f = sock.makefile("rb")
        first = f.readline().decode().strip() if info else ""
        sock.sendall(send)
        try:
            answer = f.readline().decode().strip()
        except (TimeoutError, ConnectionError) as exc:
            answer = f"<{exc.__class__.__name__}>"
        return first, answer or "<closed>"


async def test_plaintext_and_unknown_ca_are_refused(mesh: SecureSites) -> None:
    a = mesh.node("site-a")
    # A plaintext client: the server insists on TLS and refuses the CONNECT.
    info, answer = await asyncio.to_thread(
        raw_exchange, a.host, a.port, b'CONNECT {"verbose":false}\r\nPING\r\n'
    )
    assert '"tls_required":true' in info
    assert "PONG" not in answer and "+OK" not in answer, answer
    # (nats-server logs client handshake errors at debug level only: the closed connection
    # after an INFO saying tls_required is the refusal.)
    print(f"\nplaintext client -> INFO tls_required, then {answer}")
    # A plaintext route: the cluster port speaks TLS first and drops plaintext.
    _, answer = await asyncio.to_thread(
        raw_exchange,
        a.host,
        6222,
        b'CONNECT {"verbose":false,"name":"plain"}\r\nPING\r\n',
        info=False,
    )
    assert answer == "<closed>", answer
    route_refusal = await eventually(
        lambda: next(
            (
                ln.split("] ", 1)[-1]
                for ln in a.log(200000).splitlines()
                if "TLS route handshake error" in ln and "first record" in ln
            ),
            None,
        ),
        what="site-a to log the plaintext route",
    )
    print(f"plaintext route -> {answer}; server: {route_refusal}")
    # No plaintext listener anywhere: every member announces TLS on clients and routes.
    for name in MEMBERS:
        varz = mesh.node(name).varz()
        assert varz["tls_required"] is True and varz["tls_verify"] is True, varz
        assert varz["cluster"]["tls_required"] is True, varz["cluster"]  # type: ignore[index]

    # A client with a certificate from an unknown CA cannot connect to any member.
    cert, key = mesh.leaf("site-x", "n1")
    refusals = []
    for name in MEMBERS:
        node = mesh.node(name)
        ctx = client_context(mesh.pki.ca_cert(name), cert, key)
        with pytest.raises(Exception) as err:
            await nats.connect(
                servers=[node.url],
                tls=ctx,
                connect_timeout=3,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
        refusals.append(repr(err.value))
    print(f"unknown-CA client -> {refusals[0]}")
    await eventually(
        lambda: "unknown authority" in a.log(20000) or "bad certificate" in a.log(20000),
        what="site-a to log the refused client handshake",
    )

    # A fourth server, certificate from an unknown CA claiming site-a's route name, routing to
    # every member: no member takes its route, and it takes none of theirs.
    rogue = mesh.start_rogue()
    # It never becomes healthy (JetStream cannot join a cluster it cannot reach): wait for
    # it to be up, then for every member to have refused it.
    await eventually(rogue.varz, timeout=20, what="the rogue server to start")
    x_ip = mesh.sites["site-x"].data_ip
    for name in MEMBERS:
        await eventually(
            lambda n=name: re.search(  # type: ignore[misc]
                # Go's TLS client offers no certificate the server's CA list does not name;
                # one that did would fail verification ("signed by unknown authority").
                rf"{re.escape(x_ip)}:\d+ - rid:\d+ - TLS route handshake error: "
                r"tls: (client didn't provide a certificate|failed to verify certificate)",
                mesh.node(n).log(200000),
            ),
            timeout=20,
            what=f"{name} to refuse the rogue's route",
        )
        assert "n-site-x" not in route_peers(mesh, name)
    assert route_peers(mesh, "site-x") == set()
    line = next(
        ln
        for ln in mesh.node("site-a").log(200000).splitlines()
        if x_ip in ln and "TLS route handshake error: tls:" in ln
    )
    print(f"unknown-CA route -> {line.split('] ', 1)[-1]}")
    assert full_mesh(mesh)


# --- the forbidden acts --------------------------------------------------------------------


async def create_mesh(admin: Client) -> None:
    """What the admin role does once (``mesh init``): buckets and the events stream."""
    js = admin.jetstream(timeout=10)

    async def create() -> bool:
        for bucket, replicas in (
            (STATE_BUCKET, 3),
            (TRUST_BUCKET, 3),
            *((leases_bucket(s), 1) for s in MEMBERS),
        ):
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket, history=5, replicas=replicas, storage=StorageType.FILE
                )
            )
        await js.add_stream(
            StreamConfig(name=EVENTS_STREAM, subjects=["harmony.events.>"], num_replicas=3)
        )
        return True

    await eventually(create, timeout=30, what="the admin to create the buckets")


async def stream_states(admin: Client) -> dict[str, tuple[int, int]]:
    js = admin.jetstream(timeout=5)
    out = {}
    for name in (
        f"KV_{STATE_BUCKET}",
        f"KV_{TRUST_BUCKET}",
        *(f"KV_{leases_bucket(s)}" for s in MEMBERS),
        EVENTS_STREAM,
    ):
        info = await js.stream_info(name)
        out[name] = (info.state.messages, info.state.last_seq)
    return out


def server_line(log: str, subject: str) -> str:
    """The server's own record of the refusal (its log), for the closing note."""
    for line in reversed(log.splitlines()):
        if "Violation" in line and subject in line:
            return line.split("] ", 1)[-1]
    return "<not in the server log>"


async def test_site_b_agent_is_refused_every_forbidden_act(mesh: SecureSites) -> None:
    admin = await mesh.connect_person("site-a", "adm-1")
    operator = await mesh.connect_person("site-a", "ops-1")
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    rogue = await mesh.connect_agent("site-b", error_cb=on_error)
    try:
        await create_mesh(admin)
        js = rogue.jetstream(timeout=1)
        kv_a = await js.key_value(leases_bucket("site-a"))
        kv_state = await js.key_value(STATE_BUCKET)
        kv_trust = await js.key_value(TRUST_BUCKET)

        # Positive control: site-b's agent may write its own keys.
        own = await (await js.key_value(leases_bucket("site-b"))).create(
            "sess.site-b.n1.live", b"{}"
        )
        assert own > 0
        assert await kv_state.put("agent.site-b.n1", b"{}") > 0
        assert not errors, errors
        before = await stream_states(admin)

        # An operator's request to site-a's agent, whose reply inbox the rogue learned.
        inbox = operator.new_inbox()
        jsm = js

        async def stepdown() -> Any:
            return await rogue.request(
                f"$JS.API.STREAM.LEADER.STEPDOWN.KV_{STATE_BUCKET}", b"", timeout=1
            )

        async def answer_for_site_a() -> None:
            await rogue.publish(inbox, b'{"ok": true, "forged": true}')
            await rogue.flush()

        async def sub(subject: str) -> None:
            await rogue.subscribe(subject)
            await rogue.flush()

        acts: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = [
            (
                "write site-a's session key sess.site-a.n1.live",
                f"$KV.{leases_bucket('site-a')}.sess.site-a.n1.live",
                lambda: kv_a.put("sess.site-a.n1.live", b'{"state":"closed"}'),
            ),
            (
                "expire site-a's session as if site-a/n2 did it",
                f"$KV.{leases_bucket('site-a')}.sess.site-a.n1.expired.site-a.n2",
                lambda: kv_a.put("sess.site-a.n1.expired.site-a.n2", b"{}"),
            ),
            (
                "write site-a's lease claim lease.ledger.site-a.n1",
                f"$KV.{leases_bucket('site-a')}.lease.ledger.site-a.n1",
                lambda: kv_a.put("lease.ledger.site-a.n1", b"{}"),
            ),
            (
                "delete site-a's lease claim lease.ledger.site-a.n1",
                f"$KV.{leases_bucket('site-a')}.lease.ledger.site-a.n1",
                lambda: kv_a.delete("lease.ledger.site-a.n1"),
            ),
            (
                "write an Application spec app.ledger",
                f"$KV.{STATE_BUCKET}.app.ledger",
                lambda: kv_state.put("app.ledger", b"{}"),
            ),
            (
                "write a drain mark drain.site-a",
                f"$KV.{STATE_BUCKET}.drain.site-a",
                lambda: kv_state.put("drain.site-a", b"{}"),
            ),
            (
                "write a fence mark fence.ledger",
                f"$KV.{STATE_BUCKET}.fence.ledger",
                lambda: kv_state.put("fence.ledger", b"{}"),
            ),
            (
                "write a trust entry ca.site-a",
                f"$KV.{TRUST_BUCKET}.ca.site-a",
                lambda: kv_trust.put("ca.site-a", b"{}"),
            ),
            (
                "purge a stream",
                f"$JS.API.STREAM.PURGE.KV_{STATE_BUCKET}",
                lambda: jsm.purge_stream(f"KV_{STATE_BUCKET}"),
            ),
            (
                "delete a stream",
                f"$JS.API.STREAM.DELETE.KV_{leases_bucket('site-a')}",
                lambda: jsm.delete_stream(f"KV_{leases_bucket('site-a')}"),
            ),
            (
                "step a stream leader down",
                f"$JS.API.STREAM.LEADER.STEPDOWN.KV_{STATE_BUCKET}",
                stepdown,
            ),
            (
                "delete a message",
                f"$JS.API.STREAM.MSG.DELETE.KV_{STATE_BUCKET}",
                lambda: jsm.delete_msg(f"KV_{STATE_BUCKET}", 1),
            ),
            (
                "subscribe to site-a's commands harmony.cmd.site-a.n1.*",
                "harmony.cmd.site-a.n1.*",
                lambda: sub("harmony.cmd.site-a.n1.*"),
            ),
            (
                "answer a command meant for site-a (publish to the operator's reply inbox)",
                inbox,
                answer_for_site_a,
            ),
            (
                "read the operator's inbox _INBOX_user.ops-1.>",
                "_INBOX_user.ops-1.>",
                lambda: sub("_INBOX_user.ops-1.>"),
            ),
            (
                "read site-a's agent inbox _INBOX_site-a_n1.>",
                "_INBOX_site-a_n1.>",
                lambda: sub("_INBOX_site-a_n1.>"),
            ),
            ("read every inbox _INBOX.>", "_INBOX.>", lambda: sub("_INBOX.>")),
        ]
        table = []
        for act, subject, attempt in acts:
            errors.clear()
            outcome = "returned"
            try:
                await attempt()
            except Exception as exc:  # a denied request times out: the server said nothing
                outcome = exc.__class__.__name__
            refusal = await eventually(
                lambda s=subject: next(  # type: ignore[misc]
                    (e for e in errors if "permissions violation" in e and s.lower() in e),
                    None,
                ),
                timeout=5,
                what=f"the server to refuse: {act}",
            )
            assert rogue.is_connected, "refused, not disconnected"
            table.append(
                {
                    "act": act,
                    "client_error": refusal,
                    "call": outcome,
                    "server_log": server_line(mesh.node("site-b").log(400000), subject),
                }
            )

        after = await stream_states(admin)
        assert after == before, "a refused act moved a stream"
        # Control: the operator may write the drain mark the agent could not.
        assert await (await operator.jetstream(timeout=5).key_value(STATE_BUCKET)).put(
            "drain.site-a", b"{}"
        )
        print("\n" + json.dumps(table, indent=1))
        (mesh.workdir / "forbidden-acts.json").write_text(json.dumps(table, indent=1))
    finally:
        for nc in (rogue, operator, admin):
            await nc.close()


def forge_leaf(ca_dir: Path, out: Path, *, cn: str, ou: str) -> tuple[Path, Path]:
    """What a thief of ``ca_dir``'s key can do: a leaf with any subject it likes."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from mesh.trust import SiteCA

    ca = SiteCA.load(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "harmony"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (out / "forged.crt").write_bytes(cert.public_bytes(pem) + ca.cert.public_bytes(pem))
    (out / "forged.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return out / "forged.crt", out / "forged.key"


async def test_a_site_ca_mints_no_identity_another_server_accepts(mesh: SecureSites) -> None:
    """site-b's CA key is stolen: the thief mints ``CN=n1,OU=site-a`` (site-a's agent)."""
    cert, key = forge_leaf(mesh.pki.ca_dir("site-b"), mesh.workdir / "forged", cn="n1", ou="site-a")
    outcomes = {}
    for server in ("site-a", "site-b"):
        ctx = client_context(mesh.pki.ca_cert(server), cert, key)
        with pytest.raises(Exception) as err:
            await nats.connect(
                servers=[mesh.node(server).url],
                tls=ctx,
                connect_timeout=3,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
        outcomes[server] = repr(err.value)
    # site-a's client listener trusts only site-a's CA (and the operators'): TLS fails.
    assert "UNKNOWN_CA" in outcomes["site-a"] or "Connection" in outcomes["site-a"], outcomes
    # site-b trusts its own CA, but lists only site-b's agents: no user maps.
    assert "Authorization" in outcomes["site-b"], outcomes
    print(f"\nforged site-a identity from site-b's CA -> {outcomes}")
