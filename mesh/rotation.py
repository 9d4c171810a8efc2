"""Leaf rotation and certificate expiry (issue 12 item 3).

A leaf is renewed once 2/3 of its life has passed, by the site CA on this machine (bare
metal: ``trust.ca_dir`` readable), keeping its name and SANs with a fresh key; the files
are replaced atomically (key first) so a reloading server never reads half a pair.
``expiry_seconds`` gives, per certificate file in use, the seconds to the earliest
``notAfter`` in it (leaf and chain), for ``harmony_cert_expiry_seconds{cert}``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from mesh.trust import SiteCA, TrustError, cert_pem, write_atomically, write_private

RENEW_AT = 2 / 3
WARN_BELOW = datetime.timedelta(days=30)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def renew_time(cert: x509.Certificate, fraction: float = RENEW_AT) -> datetime.datetime:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * fraction


def renewal_due(cert: x509.Certificate, now: datetime.datetime | None = None) -> bool:
    return (now or _now()) >= renew_time(cert)


def leaf_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _validity(cert: x509.Certificate) -> datetime.timedelta:
    """The life ``SiteCA.issue`` was asked for (it back-dates by min(5 min, life/10))."""
    total = cert.not_valid_after_utc - cert.not_valid_before_utc
    five = datetime.timedelta(minutes=5)
    return total - five if total >= 11 * five else total / 1.1


def renew_leaf(ca: SiteCA, cert_path: Path, key_path: Path) -> x509.Certificate:
    """Re-issue the leaf at ``cert_path`` (same CN and SANs, same life, new key)."""
    old = leaf_of(cert_path)
    names = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise TrustError(f"{cert_path}: leaf has no CN")
    try:
        sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
        ips = [str(i) for i in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    cert, key_pem = ca.issue(str(names[0].value), dns=dns, ips=ips, validity=_validity(old))
    tmp = key_path.with_name(key_path.name + ".tmp")
    write_private(tmp, key_pem)
    os.replace(tmp, key_path)
    write_atomically(cert_path, cert_pem(cert) + cert_pem(ca.cert))
    return cert


def expiry_seconds(
    files: Mapping[str, Path], now: datetime.datetime | None = None
) -> dict[str, float]:
    """Seconds to the earliest expiry among the certificates in each file (negative when
    expired); files that cannot be read are left out (and reported by the caller)."""
    moment = now or _now()
    out: dict[str, float] = {}
    for name, path in files.items():
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            continue
        if certs:
            earliest = min(c.not_valid_after_utc for c in certs)
            out[name] = (earliest - moment).total_seconds()
    return out


def expiry_warnings(
    expiries: Mapping[str, float], below: datetime.timedelta = WARN_BELOW
) -> list[str]:
    """One line per certificate that expires within ``below`` (30 days for ``status``)."""
    out = []
    for name, seconds in sorted(expiries.items()):
        if seconds < 0:
            out.append(f"{name}: expired {-seconds / 86400:.1f} days ago")
        elif seconds < below.total_seconds():
            out.append(f"{name}: expires in {seconds / 86400:.1f} days")
    return out
