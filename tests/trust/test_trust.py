"""Per-site CAs, the bundle, revocation: checked with real openssl and a real mTLS server."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.bootstrap import ensure_mesh
from mesh.trust import (
    SiteCA,
    TrustError,
    TrustState,
    fingerprint,
    load_ca_certificate,
)
from tests.harness.nats import NatsNode
from tests.harness.ports import free_port
from tests.harness.wait import eventually


def openssl_verify(ca_file: Path, cert_file: Path) -> bool:
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), str(cert_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_site_ca_and_leaf_verify_with_openssl(tmp_path: Path) -> None:
    a = SiteCA.create("site-a", tmp_path / "a")
    assert (tmp_path / "a" / "ca.key").stat().st_mode & 0o077 == 0
    cert, key = a.issue("nats-a", dns=["nats.site-a.test"], ips=["127.0.0.1"])
    leaf = tmp_path / "leaf.crt"
    leaf.write_bytes(
        cert.public_bytes(
            __import__(
                "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
            ).Encoding.PEM
        )
    )
    assert openssl_verify(tmp_path / "a" / "ca.crt", leaf)
    b = SiteCA.create("site-b", tmp_path / "b")
    assert not openssl_verify(tmp_path / "b" / "ca.crt", leaf)
    # The bundle of both verifies; without a, it does not.
    both = tmp_path / "both.pem"
    both.write_bytes(TrustState(certs={"a": pem(a.cert), "b": pem(b.cert)}).bundle())
    assert openssl_verify(both, leaf)
    only_b = tmp_path / "b.pem"
    only_b.write_bytes(TrustState(certs={"b": pem(b.cert)}).bundle())
    assert not openssl_verify(only_b, leaf)
    assert b"PRIVATE KEY" not in both.read_bytes()
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_bad_certificates_are_refused_with_one_line(tmp_path: Path) -> None:
    a = SiteCA.create("site-a", tmp_path / "a")
    cert, _ = a.issue("leaf")

    with pytest.raises(TrustError, match="not a CA certificate"):
        load_ca_certificate(cert.public_bytes(Encoding.PEM), "leaf.pem")
    with pytest.raises(TrustError, match="not a PEM certificate"):
        load_ca_certificate(b"garbage", "x.pem")
    with pytest.raises(TrustError, match="created once"):
        SiteCA.create("site-a", tmp_path / "a")
    assert cli("ca", "trust-admin-init", "--out", str(tmp_path / "admin")).returncode == 0
    admin_key = str(tmp_path / "admin" / "trust-admin.key")
    result = cli("trust", "add", str(tmp_path / "nope.pem"), "--admin-key", admin_key)
    assert result.returncode == 2
    (tmp_path / "leaf.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    result = cli("trust", "add", str(tmp_path / "leaf.pem"), "--admin-key", admin_key)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a CA certificate" in result.stderr
    # No trust entry is written without the trust-admin key.
    result = cli("trust", "add", str(tmp_path / "a" / "ca.crt"))
    assert result.returncode == 2 and "--admin-key" in result.stderr


def _tls_block(dir_: Path, bundle_file: Path) -> str:
    return (
        "tls {\n"
        f'  cert_file: "{dir_ / "server.crt"}"\n'
        f'  key_file: "{dir_ / "server.key"}"\n'
        f'  ca_file: "{bundle_file}"\n'
        "  verify: true\n"
        "}\n"
    )


async def _can_connect(url: str, ctx: ssl.SSLContext) -> bool:
    try:
        nc = await nats.connect(
            servers=[url],
            tls=ctx,
            connect_timeout=2,
            max_reconnect_attempts=0,
            allow_reconnect=False,
        )
    except Exception:
        return False
    await nc.close()
    return True


def _client_ctx(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def test_revoked_site_can_no_longer_connect(tmp_path: Path, nats_server: NatsNode) -> None:
    """trust add / revoke through the CLI; a synced bundle; SIGHUP; the mTLS handshake fails."""
    # Site CAs and leaves, created with the CLI like an operator would; the trust-admin key
    # is created offline and signs every entry.
    admin = cli("ca", "trust-admin-init", "--out", str(tmp_path / "admin"))
    assert admin.returncode == 0, admin.stderr
    public_key = admin.stdout.split("public key ", 1)[1].split()[0]
    admin_key = str(tmp_path / "admin" / "trust-admin.key")
    for site in ("site-a", "site-b"):
        assert cli("ca", "init", "--site", site, "--dir", str(tmp_path / site)).returncode == 0
    out = cli(
        "ca",
        "issue",
        "server",
        "--ip",
        "127.0.0.1",
        "--dir",
        str(tmp_path / "site-a"),
        "--out",
        str(tmp_path / "srv"),
    )
    assert out.returncode == 0, out.stderr
    assert (
        cli(
            "ca",
            "issue",
            "client-b",
            "--dir",
            str(tmp_path / "site-b"),
            "--out",
            str(tmp_path / "cli"),
        ).returncode
        == 0
    )

    # The mesh holds the trust entries; the sync task writes the bundle a TLS server uses.
    nc = await nats.connect(servers=[nats_server.url])
    buckets = await ensure_mesh(nc.jetstream(), 1, stores=["site-a"])
    for site in ("site-a", "site-b"):
        added = cli(
            "trust",
            "add",
            str(tmp_path / site / "ca.crt"),
            "--admin-key",
            admin_key,
            "-s",
            nats_server.url,
        )
        assert added.returncode == 0, added.stderr
    listed = cli(
        "trust", "list", "--admin-public-key", public_key, "-s", nats_server.url
    ).stdout.splitlines()
    fp_b = fingerprint(load_ca_certificate((tmp_path / "site-b" / "ca.crt").read_bytes(), "b"))
    assert [ln.split()[:3] for ln in listed][1] == ["site-b", "trusted", fp_b], listed

    bundle_file = tmp_path / "bundle" / "ca-bundle.pem"
    from agent.trust_sync import sync_bundle

    tls_node = NatsNode(
        name="tls",
        workdir=tmp_path / "tls",
        port=free_port(),
        extra=_tls_block(tmp_path / "srv", bundle_file),
    )
    sync = asyncio.create_task(
        sync_bundle(
            buckets.trust,
            bundle_file,
            server_pid=lambda: tls_node.proc.pid if tls_node.proc else None,
            admin_public_key=public_key,
        )
    )
    try:
        await eventually(
            lambda: (
                bundle_file.exists() and bundle_file.read_bytes().count(b"BEGIN CERTIFICATE") == 2
            ),
            timeout=10,
            what="bundle with both sites",
        )
        tls_node.start()
        await tls_node.wait_ready()
        ctx = _client_ctx(
            tmp_path / "site-a" / "ca.crt",
            tmp_path / "cli" / "client-b.crt",
            tmp_path / "cli" / "client-b.key",
        )
        url = f"tls://127.0.0.1:{tls_node.port}"
        assert await _can_connect(url, ctx), tls_node.log()

        revoked = cli("trust", "revoke", "site-b", "--admin-key", admin_key, "-s", nats_server.url)
        assert revoked.returncode == 0, revoked.stderr
        await eventually(
            lambda: bundle_file.read_bytes().count(b"BEGIN CERTIFICATE") == 1,
            timeout=10,
            what="bundle without site-b",
        )
        assert not openssl_verify(bundle_file, tmp_path / "cli" / "client-b.crt")

        async def refused() -> bool:
            return not await _can_connect(url, ctx)

        await eventually(refused, timeout=10, what="site-b refused after revoke and reload")
        again = cli("trust", "revoke", "site-b", "--admin-key", admin_key, "-s", nats_server.url)
        assert again.returncode == 2 and "already revoked" in again.stderr
        listed = cli("trust", "list", "--admin-public-key", public_key, "-s", nats_server.url)
        assert "site-b               revoked" in listed.stdout, listed.stdout
    finally:
        sync.cancel()
        tls_node.stop()
        await nc.close()
