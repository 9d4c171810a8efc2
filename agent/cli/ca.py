"""``harmony-agent ca`` (this site's CA) and ``harmony-agent trust`` (the federated bundle)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import nats
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agent.cli.common import EXIT_BAD_INPUT, fail, server_option, servers
from mesh.names import TRUST_BUCKET, trust_key
from mesh.trust import (
    SiteCA,
    TrustError,
    bundle,
    cert_pem,
    fingerprint,
    load_ca_certificate,
    rfc3339,
    site_of,
    trust_entry,
    write_private,
)

T = TypeVar("T")
DEFAULT_CA_DIR = "/var/lib/harmony-agent/ca"


def ca_dir_option(func: Any) -> Any:
    return click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: Path(os.environ.get("HARMONY_CA_DIR", DEFAULT_CA_DIR)),
        show_default="$HARMONY_CA_DIR or " + DEFAULT_CA_DIR,
        help="Where this site's CA lives (the key never leaves it).",
    )(func)


@click.group()
def ca() -> None:
    """This site's certificate authority (ECDSA P-256, 10 years; leaves 90 days)."""


@ca.command("init")
@click.option("--site", required=True, help="The site this CA speaks for.")
@ca_dir_option
def ca_init(site: str, directory: Path) -> None:
    """Create the site's root CA (once)."""
    try:
        authority = SiteCA.create(site, directory)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    click.echo(f"created CA for {site} in {directory}")
    click.echo(f"fingerprint {fingerprint(authority.cert)}")
    click.echo(f"share only {directory / 'ca.crt'} (harmony-agent trust add)")


@ca.command("issue")
@click.argument("name")
@click.option("--dns", multiple=True, help="DNS subject alternative name (repeatable).")
@click.option("--ip", multiple=True, help="IP subject alternative name (repeatable).")
@click.option("--days", type=click.IntRange(1, 397), default=90, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."))
@ca_dir_option
def ca_issue(
    name: str, dns: tuple[str, ...], ip: tuple[str, ...], days: int, out: Path, directory: Path
) -> None:
    """Issue a leaf certificate NAME (for a nats-server or an agent) signed by this site."""
    try:
        authority = SiteCA.load(directory)
        cert, key_pem = authority.issue(name, dns=list(dns), ips=list(ip), days=days)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.crt").write_bytes(cert_pem(cert) + cert_pem(authority.cert))
    write_private(out / f"{name}.key", key_pem)
    click.echo(f"issued {out / (name + '.crt')} (key {out / (name + '.key')}, 0600)")
    click.echo(f"not after {rfc3339(cert.not_valid_after_utc)}")


@ca.command("show")
@ca_dir_option
def ca_show(directory: Path) -> None:
    """Print the site CA's public facts."""
    try:
        authority = SiteCA.load(directory)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    click.echo(
        json.dumps(
            {
                "site": authority.site,
                "fingerprint": fingerprint(authority.cert),
                "not_after": rfc3339(authority.cert.not_valid_after_utc),
                "subject": authority.cert.subject.rfc4514_string(),
            },
            indent=2,
        )
    )


async def _with_trust(url: str, action: Callable[[KeyValue], Awaitable[T]]) -> T:
    try:
        nc = await nats.connect(servers=servers(url), connect_timeout=3, max_reconnect_attempts=0)
    except Exception as exc:
        fail(f"mesh unreachable at {url}: {exc.__class__.__name__}")
    try:
        kv = await nc.jetstream(timeout=5).key_value(TRUST_BUCKET)
        return await action(kv)
    except (TimeoutError, nats.errors.Error) as exc:
        fail(f"mesh error: {exc!r}")
    finally:
        await nc.close()


async def _entries(kv: KeyValue) -> list[bytes]:
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    values = []
    for key in keys:
        entry = await kv.get(key)
        if entry.value:
            values.append(entry.value)
    return values


@click.group()
def trust() -> None:
    """The trust bundle: every trusted site's public CA certificate."""


@trust.command("add")
@click.argument("file", type=click.File("rb"))
@server_option
def trust_add(file: Any, server: str) -> None:
    """Trust a site's CA certificate FILE (PEM); every agent reloads its bundle."""
    try:
        cert = load_ca_certificate(file.read(), file.name)
        site = site_of(cert)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)

    async def put(kv: KeyValue) -> int:
        return await kv.put(trust_key(site), trust_entry(cert))

    asyncio.run(_with_trust(server, put))
    click.echo(f"trusted {site} {fingerprint(cert)}")


@trust.command("revoke")
@click.argument("site")
@server_option
def trust_revoke(site: str, server: str) -> None:
    """Remove SITE's CA from every bundle; its servers can no longer connect."""

    async def delete(kv: KeyValue) -> bool:
        try:
            await kv.get(trust_key(site))
        except KeyNotFoundError:
            return False
        await kv.delete(trust_key(site))
        return True

    if not asyncio.run(_with_trust(server, delete)):
        fail(f"site {site!r} is not in the trust bundle", EXIT_BAD_INPUT)
    click.echo(f"revoked {site}")


@trust.command("list")
@server_option
def trust_list(server: str) -> None:
    """One line per trusted site: fingerprint and expiry."""
    for raw in asyncio.run(_with_trust(server, _entries)):
        data = json.loads(raw)
        click.echo(f"{data['site']:<20} {data['fingerprint']}  not after {data['not_after']}")


@trust.command("bundle")
@server_option
def trust_bundle(server: str) -> None:
    """Print the bundle (PEM), as every agent writes it for its nats-server."""
    sys.stdout.buffer.write(bundle(asyncio.run(_with_trust(server, _entries))))
