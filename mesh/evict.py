"""Eviction that disconnects (issue 12 item 2): after a CA leaves the bundle, close what it
authenticated, on this node's nats-server.

A reload alone re-checks nothing that is already connected (DESIGN-NOTES). What nats-server
2.15 does offer, and what this module uses:

- **routes**: the server accepts only routes whose certificate names a configured route
  host (``verify_cert_and_check_known_urls``), and on a reload it re-checks every accepted
  route against the *new* route list and closes solicited routes whose URL was removed. So
  the evicted site's route URLs are dropped from the config before the reload. Which URL is
  whose is learned from the peer itself: ``route_certificate`` reads the certificate a
  route port presents (nats-server sends INFO in the clear, then TLS) and
  ``RouteMap`` remembers which CA issued it.
- **clients** (and leafnodes): ``$SYS.REQ.SERVER.<id>.KICK`` with ``{"cid": n}``, sent by
  the local system-account user, for every connection whose certificate chain in
  ``/connz?auth=true`` holds an evicted CA, or holds no CA that is still trusted (a client
  that did not send its chain cannot prove it is still trusted; a good one reconnects).
  ``/routez`` shows no certificates, so routes cannot be kicked this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from nats.aio.client import Client

log = structlog.get_logger("mesh.evict")

PAGE = 1024


def cert_sha256(cert: x509.Certificate) -> str:
    """The hex SHA-256 of the DER, as nats-server's ``tls_peer_certs[].cert_sha256``."""
    return cert.fingerprint(hashes.SHA256()).hex()


def spki_sha256(cert: x509.Certificate) -> str:
    """As nats-server's ``pinned_certs`` (and ``tls_peer_certs[].spki_sha256``) want it."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _peer_certificate(host: str, port: int, timeout: float) -> x509.Certificate | None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return None
    return x509.load_der_x509_certificate(der) if der else None


async def route_certificate(url: str, timeout: float = 2.0) -> x509.Certificate | None:
    """The certificate the route port at ``url`` presents, or None if it cannot be read.

    Route ports speak TLS first. Nothing is verified here (we only want to know *who* is
    there) and no client certificate is offered, so the peer drops the connection right
    after the handshake, having sent us its certificate. The probe runs in a thread with a
    blocking socket: a TLS alert on an asyncio transport was seen to disturb nats-py's own
    TLS connection in the same event loop.
    """
    parts = urlsplit(url)
    if parts.hostname is None:
        return None
    return await asyncio.to_thread(_peer_certificate, parts.hostname, parts.port or 6222, timeout)


@dataclass
class RouteMap:
    """Route URL -> the certificate its server presented last time we looked."""

    certs: dict[str, x509.Certificate] = field(default_factory=dict)

    async def refresh(self, urls: Iterable[str], timeout: float = 2.0) -> None:
        """Probe every URL; keep what we knew for those that do not answer now."""
        urls = list(urls)
        found = await asyncio.gather(*(route_certificate(u, timeout) for u in urls))
        for url, cert in zip(urls, found, strict=True):
            if cert is not None:
                self.certs[url] = cert

    def issued_by_any(self, url: str, cas: Sequence[x509.Certificate]) -> bool:
        cert = self.certs.get(url)
        return cert is not None and any(issued_by(cert, ca) for ca in cas)


def _get_json(url: str, timeout: float = 2.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


async def monitor(base: str, endpoint: str) -> dict[str, Any]:
    return await asyncio.to_thread(_get_json, f"{base.rstrip('/')}/{endpoint}")


async def connections(base: str) -> list[dict[str, Any]]:
    """Every client connection with its certificate chain (``/connz?auth=true``), paged."""
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = await monitor(base, f"connz?auth=true&subs=false&limit={PAGE}&offset={offset}")
        conns = page.get("connections") or []
        out += conns
        if len(conns) < PAGE:
            return out
        offset += PAGE


def to_kick(
    conns: Iterable[dict[str, Any]],
    evicted: Sequence[x509.Certificate],
    trusted: Sequence[x509.Certificate],
) -> list[int]:
    """Client ids authenticated by an evicted CA, or whose chain proves no trusted CA."""
    bad = {cert_sha256(c) for c in evicted}
    good = {cert_sha256(c) for c in trusted}
    cids = []
    for conn in conns:
        chain = conn.get("tls_peer_certs")
        if not chain:
            continue  # not a TLS client (e.g. our own loopback system connection)
        shas = {c.get("cert_sha256") for c in chain}
        if shas & bad or not shas & good:
            cids.append(int(conn["cid"]))
    return cids


async def kick(system: Client, server_id: str, cids: Iterable[int], timeout: float = 2.0) -> int:
    """``$SYS.REQ.SERVER.<id>.KICK`` each client; the number the server confirmed."""
    done = 0
    for cid in cids:
        try:
            reply = await system.request(
                f"$SYS.REQ.SERVER.{server_id}.KICK", json.dumps({"cid": cid}).encode(), timeout
            )
        except Exception as exc:
            log.warning(
                "kick_failed",
                msg=f"kick of connection {cid} failed: {exc!r}",
                cid=cid,
                error=repr(exc),
            )
            continue
        body = json.loads(reply.data or b"{}")
        if "error" in body:
            log.info(
                "kick_refused",
                msg=f"kick of connection {cid} refused (already gone?)",
                cid=cid,
                error=body["error"],
            )
        else:
            done += 1
    return done


async def wait_reloaded(base: str, before: str | None, timeout: float = 5.0) -> bool:
    """Wait until ``/varz`` shows a config load time other than ``before``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            varz = await monitor(base, "varz")
            if varz.get("config_load_time") != before:
                return True
        await asyncio.sleep(0.05)
    return False
