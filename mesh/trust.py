"""Per-site certificate authorities and the federated trust bundle (ADR 017-1, CONTRACT 8).

Each site owns a root CA (ECDSA P-256, 10 years) whose private key never leaves the site:
nothing here serialises a CA key anywhere but the site's own directory (0600). Sites share
only public CA certificates, through ``ca.<site>`` entries in ``harmony-trust``; the bundle
every nats-server verifies peers against is their concatenation, so revoking a site is
deleting its entry, after which every agent rewrites its bundle and reloads its server.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_YEARS = 10
LEAF_DAYS = 90
CA_CERT = "ca.crt"
CA_KEY = "ca.key"


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
    ) -> tuple[x509.Certificate, bytes]:
        """A leaf for a nats-server or agent (server and client auth): (cert, key PEM)."""
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
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
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
    """Parse and vet a CA certificate offered for the bundle; never accept a leaf."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise TrustError(f"{source}: not a PEM certificate") from None
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise TrustError(f"{source}: not a CA certificate (no basicConstraints)") from None
    if not basic.ca:
        raise TrustError(f"{source}: not a CA certificate (basicConstraints CA:FALSE)")
    if cert.not_valid_after_utc < _now():
        raise TrustError(f"{source}: expired on {rfc3339(cert.not_valid_after_utc)}")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise TrustError(f"{source}: site CAs must be ECDSA P-256")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
        raise TrustError(f"{source}: not self-signed: {exc!r}") from None
    return cert


def trust_entry(cert: x509.Certificate) -> bytes:
    """The ``ca.<site>`` value: public facts plus the PEM; never a key."""
    return json.dumps(
        {
            "site": site_of(cert),
            "fingerprint": fingerprint(cert),
            "not_after": rfc3339(cert.not_valid_after_utc),
            "subject": cert.subject.rfc4514_string(),
            "certificate": cert_pem(cert).decode(),
            "added_at": rfc3339(_now()),
        }
    ).encode()


def bundle(entries: list[bytes]) -> bytes:
    """Concatenate the certificates of valid entries, sorted by site for stable output."""
    pems: dict[str, str] = {}
    for raw in entries:
        try:
            data = json.loads(raw)
            cert = load_ca_certificate(data["certificate"].encode(), "entry")
        except (ValueError, KeyError, TypeError, TrustError):
            continue
        pems[site_of(cert)] = cert_pem(cert).decode()
    return "".join(pems[s] for s in sorted(pems)).encode()


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
    os.replace(tmp, path)
    return True
