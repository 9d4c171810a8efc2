"""Signed trust entries (issue 12 item 1): every forged or malformed ``ca.*`` entry is
ignored, counted by reason and listed in the status; the bundle on disk does not move; the
trust-sync task keeps running; a site's own CA stays in its own bundle; a revoke is a signed
tombstone that no replay undoes, even across a restart."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from prometheus_client import REGISTRY

from agent.trust_sync import TrustSync
from mesh.trust import (
    Rejected,
    SiteCA,
    TrustState,
    cert_pem,
    check_ca_profile,
    fingerprint,
    next_serial,
    sign_entry,
    verify_entry,
)
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

NOW = datetime.datetime.now(datetime.UTC)


def make_ca(
    subject: list[x509.NameAttribute],
    *,
    ca: bool = True,
    pathlen: int | None = 0,
    cert_sign: bool = True,
    not_after: datetime.timedelta = datetime.timedelta(days=365),
    not_before: datetime.timedelta = datetime.timedelta(minutes=-5),
) -> x509.Certificate:
    """A self-signed P-256 certificate with whatever profile a test needs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(subject)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + not_before)
        .not_valid_after(NOW + not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=pathlen if ca else None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=cert_sign,
                crl_sign=cert_sign,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(key, hashes.SHA256())
    )


def ou(site: str) -> list[x509.NameAttribute]:
    return [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "harmony"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site),
        x509.NameAttribute(NameOID.COMMON_NAME, f"harmony {site} root CA"),
    ]


@pytest.fixture(scope="module")
def admin() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteCA]:
    root = tmp_path_factory.mktemp("cas")
    return {s: SiteCA.create(s, root / s) for s in ("site-a", "site-b", "zzz")}


def forgeries(
    admin: ed25519.Ed25519PrivateKey, cas: dict[str, SiteCA]
) -> list[tuple[str, str, bytes]]:
    """(key, expected reason, value): every way an entry can be wrong."""
    other_admin = ed25519.Ed25519PrivateKey.generate()
    a_entry = sign_entry("site-a", cas["site-a"].cert, admin, next_serial(None))
    # cert-manager's CA as deploy/kubernetes had it: a CN, no OU.
    no_ou = make_ca([x509.NameAttribute(NameOID.COMMON_NAME, "harmony-site-a-ca")])
    expired = make_ca(
        ou("site-a"),
        not_before=datetime.timedelta(days=-30),
        not_after=datetime.timedelta(days=-1),
    )
    leaf, _ = cas["site-a"].issue("n1")
    v1_entry = json.dumps(
        {"site": "site-a", "certificate": cert_pem(cas["zzz"].cert).decode()}
    ).encode()
    swapped = sign_entry("zzz", cas["site-a"].cert, admin, next_serial(None))
    return [
        ("ca.zzz", "unsigned", v1_entry),
        ("ca.zzz", "site_mismatch", a_entry),  # site-a's genuine entry copied to ca.zzz
        ("ca.zzz", "ou_mismatch", swapped),  # signed for ca.zzz, but the CA says OU=site-a
        (
            "ca.site-a",
            "bad_signature",
            sign_entry("site-a", cas["zzz"].cert, other_admin, next_serial(None)),
        ),
        ("ca.site-a", "no_ou", sign_entry("site-a", no_ou, admin, next_serial(None))),
        ("ca.site-a", "expired", sign_entry("site-a", expired, admin, next_serial(None))),
        ("ca.site-a", "not_ca", sign_entry("site-a", leaf, admin, next_serial(None))),
        (
            "ca.site-a",
            "bad_profile",
            sign_entry("site-a", make_ca(ou("site-a"), pathlen=None), admin, next_serial(None)),
        ),
        (
            "ca.site-a",
            "bad_profile",
            sign_entry("site-a", make_ca(ou("site-a"), cert_sign=False), admin, next_serial(None)),
        ),
        ("ca.site-a", "malformed", b"[" * 30000 + b"]" * 30000),
        ("ca.site-a", "too_large", b"{" + b" " * 70000 + b"}"),
        ("ca.site-a", "malformed", b"\xff\xfe not json"),
        ("ca.site-a", "malformed", json.dumps({**json.loads(a_entry), "extra": 1}).encode()),
        (
            "ca.site-a",
            "future_serial",
            sign_entry("site-a", cas["site-a"].cert, admin, next_serial(None) + 2 * 86400_000),
        ),
        ("ca.Site_A", "bad_key", a_entry),
        ("ca.operators", "bad_key", a_entry),
    ]


def test_each_forgery_is_rejected_for_its_reason(
    admin: ed25519.Ed25519PrivateKey, cas: dict[str, SiteCA]
) -> None:
    public = admin.public_key()
    good = verify_entry("ca.site-a", sign_entry("site-a", cas["site-a"].cert, admin, 5), public)
    assert good.site == "site-a" and good.certificate == cas["site-a"].cert
    for key, reason, value in forgeries(admin, cas):
        with pytest.raises(Rejected) as err:
            verify_entry(key, value, public)
        assert err.value.reason == reason, (key, reason, err.value)


def test_revoke_is_a_signed_tombstone_and_serials_only_grow(
    admin: ed25519.Ed25519PrivateKey, cas: dict[str, SiteCA]
) -> None:
    public = admin.public_key()
    state = TrustState()
    old = sign_entry("site-b", cas["site-b"].cert, admin, 100)
    assert state.apply(verify_entry("ca.site-b", old, public))
    assert state.apply(verify_entry("ca.site-b", sign_entry("site-b", None, admin, 101), public))
    assert "site-b" not in state.certs and state.revoked == {"site-b": 101}
    with pytest.raises(Rejected, match="stale"):
        state.apply(verify_entry("ca.site-b", old, public))  # the replay
    assert state.apply(
        verify_entry("ca.site-b", sign_entry("site-b", cas["site-b"].cert, admin, 102), public)
    )
    # The bundle is keyed by the KV key; the own site's CA is always in its own bundle.
    state.apply(verify_entry("ca.site-a", sign_entry("site-a", None, admin, 7), public))
    bundle = state.bundle("site-a", cas["site-a"].cert)
    assert cert_pem(cas["site-a"].cert) in bundle and cert_pem(cas["site-b"].cert) in bundle


def test_profile_check_wants_a_site_ca(cas: dict[str, SiteCA]) -> None:
    # The fixture's CAs are made when the test runs, perhaps long after NOW (collection).
    now = datetime.datetime.now(datetime.UTC)
    check_ca_profile(cas["site-a"].cert, "site-a", now)
    with pytest.raises(Rejected, match="ou_mismatch"):
        check_ca_profile(cas["site-a"].cert, "site-b", now)
    with pytest.raises(Rejected, match="not_yet_valid"):
        check_ca_profile(
            make_ca(ou("site-a"), not_before=datetime.timedelta(days=1)), "site-a", NOW
        )


# --- the task, against a real bucket ---------------------------------------------------------


@pytest.fixture
async def trust_kv(nats_server: NatsNode) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(servers=[nats_server.url])
    try:
        yield await nc.jetstream().create_key_value(
            KeyValueConfig(bucket="harmony-trust", history=5)
        )
    finally:
        await nc.close()


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("harmony_trust_rejected_total", {"reason": reason}) or 0.0


def start(sync: TrustSync) -> asyncio.Task[None]:
    return asyncio.create_task(sync.run(), name="trust-sync")


async def test_forged_entries_change_nothing_and_stop_nothing(
    tmp_path: Path,
    trust_kv: KeyValue,
    admin: ed25519.Ed25519PrivateKey,
    cas: dict[str, SiteCA],
) -> None:
    bundle = tmp_path / "bundle.pem"
    await trust_kv.put("ca.site-a", sign_entry("site-a", cas["site-a"].cert, admin, 1))
    await trust_kv.put("ca.site-b", sign_entry("site-b", cas["site-b"].cert, admin, 1))
    sync = TrustSync(
        trust_kv,
        bundle,
        admin.public_key(),
        own_site="site-a",
        own_ca=cas["site-a"].cert,
        state_path=tmp_path / "state.json",
    )
    task = start(sync)
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
        good = bundle.read_bytes()
        assert good.count(b"BEGIN CERTIFICATE") == 2
        for key, reason, value in forgeries(admin, cas):
            if not key.startswith("ca.") or key in ("ca.Site_A",):
                continue  # not a key the watch ("ca.*") can carry ... or the KV accepts
            before = rejected(reason)
            await trust_kv.put(key, value)
            await eventually(lambda r=reason, b=before: rejected(r) > b, what=f"{reason} counted")  # type: ignore[misc]
            assert bundle.read_bytes() == good, reason
            assert not task.done(), task
            assert sync.status()["last_rejected"][-1]["reason"] == reason
        # A bare delete is no revoke.
        before = rejected("unsigned_delete")
        await trust_kv.delete("ca.site-b")
        await eventually(lambda: rejected("unsigned_delete") > before, what="delete ignored")
        assert bundle.read_bytes() == good
        status = sync.status()
        assert set(status["sites"]) == {"site-a", "site-b"}
        assert status["sites"]["site-b"]["fingerprint"] == fingerprint(cas["site-b"].cert)
        assert status["rejected"]["unsigned"] >= 1 and status["rejected"]["no_ou"] >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_revoke_replay_and_own_site(
    tmp_path: Path,
    trust_kv: KeyValue,
    admin: ed25519.Ed25519PrivateKey,
    cas: dict[str, SiteCA],
) -> None:
    bundle = tmp_path / "bundle.pem"
    old_b = sign_entry("site-b", cas["site-b"].cert, admin, 10)
    await trust_kv.put("ca.site-a", sign_entry("site-a", cas["site-a"].cert, admin, 10))
    await trust_kv.put("ca.site-b", old_b)

    def make() -> TrustSync:
        return TrustSync(
            trust_kv,
            bundle,
            admin.public_key(),
            own_site="site-a",
            own_ca=cas["site-a"].cert,
            state_path=tmp_path / "state.json",
        )

    def has(site: str) -> bool:
        return cert_pem(cas[site].cert) in bundle.read_bytes()

    sync = make()
    task = start(sync)
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
        assert has("site-a") and has("site-b")
        # A signed revoke of site-b: gone.
        await trust_kv.put("ca.site-b", sign_entry("site-b", None, admin, 11))
        await eventually(lambda: not has("site-b"), what="site-b revoked")
        # A signed revoke of our own site: recorded, but our CA stays in our bundle.
        await trust_kv.put("ca.site-a", sign_entry("site-a", None, admin, 11))
        await eventually(lambda: sync.status()["own_site_revoked"], what="own revoke seen")
        assert has("site-a")
        # Replaying site-b's old signed entry does not bring it back.
        before = rejected("stale")
        await trust_kv.put("ca.site-b", old_b)
        await eventually(lambda: rejected("stale") > before, what="replay refused")
        assert not has("site-b")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # After a restart the replay is still stale (the serials are persisted), and only a
    # newer signed entry restores site-b.
    sync = make()
    before = rejected("stale")
    task = start(sync)
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
        assert rejected("stale") > before
        assert not has("site-b") and has("site-a")
        await trust_kv.put("ca.site-b", sign_entry("site-b", cas["site-b"].cert, admin, 12))
        await eventually(lambda: has("site-b"), what="site-b trusted again")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_admin_key_files(tmp_path: Path) -> None:
    from mesh.trust import create_admin_key, load_admin_key, parse_admin_public_key

    public = create_admin_key(tmp_path / "admin")
    key = load_admin_key(tmp_path / "admin" / "trust-admin.key")
    assert (tmp_path / "admin" / "trust-admin.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "admin").stat().st_mode & 0o077 == 0
    raw = serialization.PublicFormat.Raw
    assert parse_admin_public_key(public).public_bytes(
        serialization.Encoding.Raw, raw
    ) == key.public_key().public_bytes(serialization.Encoding.Raw, raw)


async def test_syncing_before_entries_exist_evicts_nobody(
    tmp_path: Path,
    trust_kv: KeyValue,
    admin: ed25519.Ed25519PrivateKey,
    cas: dict[str, SiteCA],
) -> None:
    """The installed bundle is the bootstrap trust until signed entries speak for a site."""
    bundle = tmp_path / "bundle.pem"
    installed = cert_pem(cas["site-a"].cert) + cert_pem(cas["site-b"].cert)
    bundle.write_bytes(installed)
    changes: list[int] = []

    async def on_change(change: object) -> None:
        changes.append(1)

    sync = TrustSync(
        trust_kv,
        bundle,
        admin.public_key(),
        own_site="site-a",
        own_ca=cas["site-a"].cert,
        state_path=tmp_path / "state.json",
        on_change=on_change,  # type: ignore[arg-type]
    )
    task = start(sync)
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
        assert bundle.read_bytes() == installed and changes == []
        assert sync.status()["bootstrap_only"] == ["site-a", "site-b"]
        await trust_kv.put("ca.site-b", sign_entry("site-b", None, admin, next_serial(None)))
        await eventually(
            lambda: cert_pem(cas["site-b"].cert) not in bundle.read_bytes(), what="b out"
        )
        assert changes == [1]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
