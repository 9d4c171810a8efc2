"""Per-site certificate authorities and the federated trust bundle (ADR 017-1, CONTRACT 8).

Each site owns a root CA (ECDSA P-256, 10 years) whose private key never leaves the site:
nothing here serialises a CA key anywhere but the site's own directory (0600, outside the
agent's state directory). Sites share only public CA certificates, through ``ca.<site>``
entries in ``harmony-trust``; the bundle every nats-server verifies routes against is their
concatenation.

Entries are signed (issue 12) by the trust-admin's Ed25519 key, created offline and never
stored in the mesh. The signature covers the KV key, the site, a serial that only grows
(milliseconds at signing, at least the previous serial + 1), the certificate or a revoke
tombstone. An agent keeps a site's CA only from an entry that verifies, whose key is
``ca.<OU of the certificate>``, whose certificate is a proper site CA, and whose serial is
newer than anything it accepted for that site before (so a revoked CA cannot come back by
replaying its old entry). The bundle is keyed by the KV key, never by what a certificate
claims.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_YEARS = 10
LEAF_DAYS = 90
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
DEFAULT_CA_DIR = Path("/etc/harmony-agent/ca")
ADMIN_KEY = "trust-admin.key"
ADMIN_PUB = "trust-admin.pub"
ADMIN_KEY_PREFIX = "ed25519:"
SITE_RE = re.compile(r"^[a-z0-9-]{1,63}$")
RESERVED_SITES = frozenset({"app", "operators"})
"""``app`` addresses applications in command subjects; ``operators`` is the OU of people."""
ENTRY_VERSION = 2
MAX_ENTRY_BYTES = 64 * 1024
MAX_SERIAL_AHEAD_MS = 24 * 3600 * 1000
"""A serial (milliseconds at signing) further ahead of our clock is refused: a stolen admin
key must not be able to sign a serial so high that no honest entry could follow it."""
SIGNING_CONTEXT = b"harmony-trust-entry-v2\n"


class TrustError(ValueError):
    """A certificate problem phrased for one line of output."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def write_private(path: Path, data: bytes) -> None:
    """Create with 0600 from the first byte: a key must never exist world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class SiteCA:
    site: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, site: str, directory: Path) -> SiteCA:
        if (directory / CA_KEY).exists():
            raise TrustError(f"{directory / CA_KEY} exists: a site CA is created once")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "harmony"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site),
                x509.NameAttribute(NameOID.COMMON_NAME, f"harmony {site} root CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        write_private(directory / CA_KEY, _key_pem(key))
        (directory / CA_CERT).write_bytes(cert_pem(cert))
        return cls(site, cert, key)

    @classmethod
    def load(cls, directory: Path) -> SiteCA:
        try:
            cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        except FileNotFoundError as exc:
            raise TrustError(f"no site CA in {directory} (run `harmony-agent ca init`)") from exc
        except PermissionError:
            raise TrustError(f"{directory}: not readable by this user (root only)") from None
        except ValueError as exc:
            raise TrustError(f"{directory}: unreadable CA: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TrustError(f"{directory / CA_KEY}: not an EC key")
        return cls(site_of(cert), cert, key)

    def issue(
        self,
        name: str,
        *,
        dns: list[str] | None = None,
        ips: list[str] | None = None,
        days: int = LEAF_DAYS,
        validity: datetime.timedelta | None = None,
    ) -> tuple[x509.Certificate, bytes]:
        """A leaf for a nats-server or agent (server and client auth): (cert, key PEM).

        ``validity`` overrides ``days`` (tests use seconds); the leaf is back-dated by a
        tenth of its life, at most 5 minutes, for clocks a little behind ours.
        """
        life = validity if validity is not None else datetime.timedelta(days=days)
        backdate = min(datetime.timedelta(minutes=5), life / 10)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
        try:
            sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
        except ValueError as exc:
            raise TrustError(f"--ip: {exc}") from None
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "harmony"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.site),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate)
            .not_valid_after(now + life)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256()), _key_pem(key)


def site_of(cert: x509.Certificate) -> str:
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not units:
        raise TrustError("certificate has no OU naming its site")
    return str(units[0].value)


def load_ca_certificate(pem: bytes, source: str) -> x509.Certificate:
    """Parse and vet a site CA certificate offered for the bundle, exactly as agents will
    check it (``check_ca_profile``); never accept a leaf."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise TrustError(f"{source}: not a PEM certificate") from None
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    site = str(units[0].value) if units else ""
    try:
        check_ca_profile(cert, site, _now())
        trust_key_site(f"ca.{site}")
    except Rejected as exc:
        what = "not a CA certificate" if exc.reason == "not_ca" else exc.reason.replace("_", " ")
        raise TrustError(f"{source}: {what} ({exc.detail})") from None
    except TrustError as exc:
        raise TrustError(f"{source}: OU {site!r}: {exc}") from None
    return cert


# --- the trust-admin key ---------------------------------------------------------------


def admin_public_key_string(key: ed25519.Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return ADMIN_KEY_PREFIX + base64.b64encode(raw).decode()


def parse_admin_public_key(text: str) -> ed25519.Ed25519PublicKey:
    """``ed25519:<base64 of the 32 raw bytes>``, as ``ca trust-admin-init`` prints it."""
    value = text.strip()
    if not value.startswith(ADMIN_KEY_PREFIX):
        raise TrustError(f"trust-admin public key must look like {ADMIN_KEY_PREFIX}<base64>")
    try:
        raw = base64.b64decode(value[len(ADMIN_KEY_PREFIX) :], validate=True)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise TrustError("trust-admin public key: not 32 bytes of base64") from None


def create_admin_key(directory: Path) -> str:
    """Create the trust-admin key pair in ``directory`` (offline); return the public key."""
    if (directory / ADMIN_KEY).exists():
        raise TrustError(f"{directory / ADMIN_KEY} exists: the trust-admin key is created once")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    write_private(
        directory / ADMIN_KEY,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    public = admin_public_key_string(key.public_key())
    (directory / ADMIN_PUB).write_text(public + "\n")
    return public


def load_admin_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise TrustError(f"{path}: no such file (harmony-agent ca trust-admin-init)") from None
    except (ValueError, TypeError):
        raise TrustError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TrustError(f"{path}: not an Ed25519 key")
    return key


# --- signed entries ----------------------------------------------------------------------


def trust_key_site(key: str) -> str:
    """The site a ``ca.<site>`` key speaks for; TrustError for any other key."""
    site = key.removeprefix("ca.")
    if not key.startswith("ca.") or not SITE_RE.match(site) or site in RESERVED_SITES:
        raise TrustError(f"{key!r} is not ca.<site> with a valid site name")
    return site


def _payload(fields: dict[str, Any]) -> bytes:
    return SIGNING_CONTEXT + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def next_serial(previous: int | None) -> int:
    """Milliseconds now, but always past the previous serial (clocks go backwards)."""
    now = time.time_ns() // 1_000_000
    return now if previous is None else max(now, previous + 1)


def sign_entry(
    site: str,
    cert: x509.Certificate | None,
    admin: ed25519.Ed25519PrivateKey,
    serial: int,
) -> bytes:
    """The ``ca.<site>`` value: the certificate, or a revoke tombstone when ``cert`` is None."""
    key = f"ca.{site}"
    trust_key_site(key)
    fields: dict[str, Any] = {
        "v": ENTRY_VERSION,
        "key": key,
        "site": site,
        "serial": serial,
        "signed_at": rfc3339(_now()),
        "revoked": cert is None,
        "certificate": cert_pem(cert).decode() if cert is not None else None,
    }
    signature = admin.sign(_payload(fields))
    return json.dumps({**fields, "signature": base64.b64encode(signature).decode()}).encode()


class Rejected(Exception):
    """An entry the agent ignores; ``reason`` is a metric label, ``detail`` one line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Verified:
    """A signed entry that passed every check."""

    site: str
    serial: int
    certificate: x509.Certificate | None
    """None: a revoke tombstone."""
    signed_at: str


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int,
    "key": str,
    "site": str,
    "serial": int,
    "signed_at": str,
    "revoked": bool,
    "certificate": (str, type(None)),
    "signature": str,
}


def _decode(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_ENTRY_BYTES:
        raise Rejected("too_large", f"{len(raw)} bytes (limit {MAX_ENTRY_BYTES})")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise Rejected("malformed", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise Rejected("malformed", "not JSON") from None
    if not isinstance(data, dict):
        raise Rejected("malformed", "not a JSON object")
    if "signature" not in data:
        raise Rejected("unsigned", "no signature (entries are signed by the trust-admin key)")
    if set(data) != set(_FIELDS):
        raise Rejected("malformed", f"fields {sorted(data)} are not {sorted(_FIELDS)}")
    for name, kind in _FIELDS.items():
        value = data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise Rejected("malformed", f"{name} has the wrong type")
    return data


def check_ca_profile(cert: x509.Certificate, site: str, now: datetime.datetime) -> None:
    """A site CA: self-signed P-256, CA:TRUE pathlen 0, keyCertSign, valid now, OU = site."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise Rejected("not_ca", "no basicConstraints") from None
    if not basic.ca:
        raise Rejected("not_ca", "basicConstraints CA:FALSE")
    if basic.path_length != 0:
        raise Rejected("bad_profile", f"pathlen {basic.path_length}, a site CA needs 0")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise Rejected("bad_profile", "no keyUsage") from None
    if not usage.key_cert_sign:
        raise Rejected("bad_profile", "keyUsage lacks keyCertSign")
    if now < cert.not_valid_before_utc:
        raise Rejected("not_yet_valid", f"valid from {rfc3339(cert.not_valid_before_utc)}")
    if now > cert.not_valid_after_utc:
        raise Rejected("expired", f"expired on {rfc3339(cert.not_valid_after_utc)}")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise Rejected("bad_profile", "site CAs are ECDSA P-256")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise Rejected("bad_profile", "not self-signed") from None
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not units:
        raise Rejected("no_ou", "the certificate's subject has no OU naming its site")
    if len(units) != 1 or units[0].value != site:
        raise Rejected("ou_mismatch", f"OU {units[0].value!r} is not the key's site {site!r}")


def verify_entry(
    key: str,
    raw: bytes,
    admin: ed25519.Ed25519PublicKey,
    *,
    now: datetime.datetime | None = None,
) -> Verified:
    """Everything issue 12 asks of a ``ca.<site>`` entry, or Rejected(reason)."""
    try:
        site = trust_key_site(key)
    except TrustError as exc:
        raise Rejected("bad_key", str(exc)) from None
    data = _decode(raw)
    try:
        signature = base64.b64decode(data["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise Rejected("bad_signature", "signature is not base64") from None
    fields = {k: v for k, v in data.items() if k != "signature"}
    try:
        admin.verify(signature, _payload(fields))
    except InvalidSignature:
        raise Rejected("bad_signature", "not signed by the configured trust-admin key") from None
    if data["v"] != ENTRY_VERSION:
        raise Rejected("malformed", f"version {data['v']}")
    if data["key"] != key or data["site"] != site:
        raise Rejected("site_mismatch", f"signed for {data['key']!r}, stored at {key!r}")
    moment = now or _now()
    if data["serial"] > moment.timestamp() * 1000 + MAX_SERIAL_AHEAD_MS:
        raise Rejected("future_serial", f"serial {data['serial']} is more than a day ahead")
    if data["revoked"]:
        if data["certificate"] is not None:
            raise Rejected("malformed", "a tombstone carries no certificate")
        return Verified(site, data["serial"], None, data["signed_at"])
    if data["certificate"] is None:
        raise Rejected("malformed", "no certificate")
    try:
        cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    except ValueError:
        raise Rejected("malformed", "certificate is not PEM") from None
    check_ca_profile(cert, site, moment)
    return Verified(site, data["serial"], cert, data["signed_at"])


# --- what one node trusts ----------------------------------------------------------------


@dataclass
class TrustState:
    """Accepted entries per site, and the highest serial ever accepted (persisted: a replay
    of an older entry after a restart is still stale)."""

    serials: dict[str, int] = field(default_factory=dict)
    certs: dict[str, str] = field(default_factory=dict)
    """site -> PEM of its CA, for sites not revoked."""
    revoked: dict[str, int] = field(default_factory=dict)
    """site -> serial of its tombstone."""
    seeded: dict[str, str] = field(default_factory=dict)
    """site -> PEM from the operator's bootstrap bundle (the file as installed, read once):
    trusted until a signed entry for that site (a CA or a tombstone) is accepted, so that
    an agent that syncs before the entries are published evicts nobody."""

    def seed(self, pems: bytes) -> None:
        """Remember the bootstrap bundle, keyed by each CA's OU (an operator's file, not an
        entry); certificates without a valid site OU are ignored."""
        try:
            certs = x509.load_pem_x509_certificates(pems)
        except ValueError:
            return
        for cert in certs:
            units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            site = str(units[0].value) if len(units) == 1 else ""
            if SITE_RE.match(site) and site not in RESERVED_SITES:
                self.seeded.setdefault(site, cert_pem(cert).decode())

    def trusted(self) -> dict[str, str]:
        """site -> PEM of every CA trusted now: signed entries, then seeds of sites that
        never had one."""
        pems = {s: p for s, p in self.seeded.items() if s not in self.serials}
        pems.update(self.certs)
        return pems

    def apply(self, entry: Verified) -> bool:
        """Record a verified entry; Rejected("stale") unless its serial is new. True when
        the set of trusted CAs changed."""
        last = self.serials.get(entry.site)
        if last is not None and entry.serial <= last:
            raise Rejected("stale", f"serial {entry.serial} is not after {last}")
        before = self.trusted().get(entry.site)
        self.serials[entry.site] = entry.serial
        if entry.certificate is None:
            self.certs.pop(entry.site, None)
            self.revoked[entry.site] = entry.serial
        else:
            self.certs[entry.site] = cert_pem(entry.certificate).decode()
            self.revoked.pop(entry.site, None)
        return self.trusted().get(entry.site) != before

    def to_json(self) -> str:
        return json.dumps(
            {
                "serials": self.serials,
                "certs": self.certs,
                "revoked": self.revoked,
                "seeded": self.seeded,
            },
            indent=1,
        )

    @classmethod
    def load(cls, path: Path) -> TrustState:
        """The persisted state; an unreadable file starts empty (and is reported by caller)."""
        try:
            data = json.loads(path.read_text())
            return cls(
                serials={str(k): int(v) for k, v in data["serials"].items()},
                certs={str(k): str(v) for k, v in data["certs"].items()},
                revoked={str(k): int(v) for k, v in data["revoked"].items()},
                seeded={str(k): str(v) for k, v in data.get("seeded", {}).items()},
            )
        except FileNotFoundError:
            return cls()

    def bundle(self, own_site: str | None = None, own_ca: x509.Certificate | None = None) -> bytes:
        """The PEM bundle, sorted by site (stable output). A site's own CA is always in its
        own bundle, whatever the mesh says about it."""
        pems = self.trusted()
        if own_site is not None and own_ca is not None:
            pems[own_site] = cert_pem(own_ca).decode()
        return "".join(pems[s] for s in sorted(pems)).encode()


@dataclass(frozen=True)
class EntryView:
    """What ``trust list`` and ``status`` show: facts recomputed from the certificate."""

    key: str
    site: str | None
    state: str
    """trusted, revoked, or rejected:<reason>"""
    fingerprint: str | None
    not_after: str | None
    serial: int | None
    detail: str = ""


def describe(key: str, raw: bytes, admin: ed25519.Ed25519PublicKey | None) -> EntryView:
    """One entry as an operator should see it: the site is the KV key's, the fingerprint is
    computed here from the certificate (never read from the entry). Without the admin key
    the signature is not checked and the state says so."""
    try:
        site: str | None = trust_key_site(key)
    except TrustError:
        site = None
    if admin is not None:
        try:
            v = verify_entry(key, raw, admin)
        except Rejected as exc:
            return EntryView(key, site, f"rejected:{exc.reason}", None, None, None, exc.detail)
        if v.certificate is None:
            return EntryView(key, v.site, "revoked", None, None, v.serial)
        return EntryView(
            key,
            v.site,
            "trusted",
            fingerprint(v.certificate),
            rfc3339(v.certificate.not_valid_after_utc),
            v.serial,
        )
    try:
        data = _decode(raw)
    except Rejected as exc:
        return EntryView(key, site, f"rejected:{exc.reason}", None, None, None, exc.detail)
    serial = data["serial"]
    if data["revoked"] or data["certificate"] is None:
        return EntryView(key, site, "unverified-revoked", None, None, serial, "no admin key")
    try:
        cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    except ValueError:
        return EntryView(key, site, "rejected:malformed", None, None, serial, "not PEM")
    return EntryView(
        key,
        site,
        "unverified",
        fingerprint(cert),
        rfc3339(cert.not_valid_after_utc),
        serial,
        "signature not checked (no trust-admin public key given)",
    )


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Replace ``path`` if its content differs; True when it changed."""
    if path.exists() and path.read_bytes() == data:
        return False
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True
