"""``harmony-agent ca`` (this site's CA) and ``harmony-agent trust`` (the federated bundle).

``trust`` talks to the mesh like every other command: the connection options, a deadline
(``--timeout``, default 5s) on the connection and on every read and write, one line when
anything fails.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.cli.completion_names import complete_sites
from agent.cli.options import mesh_options, settings

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

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
    """This site's certificate authority.

    ECDSA P-256, valid 10 years; it issues leaf certificates of 90 days.
    """


@ca.command("init")
@click.option("--site", required=True, help="The site this CA speaks for.")
@ca_dir_option
def ca_init(site: str, directory: Path) -> None:
    """Create the site's root CA (once)."""
    from mesh.trust import SiteCA, TrustError, fingerprint

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
    from mesh.trust import SiteCA, TrustError, cert_pem, rfc3339, write_private

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
    from mesh.trust import SiteCA, TrustError, fingerprint, rfc3339

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


def _with_trust(ctx: click.Context, action: Callable[[KeyValue], Awaitable[T]]) -> T:
    """Run ``action`` on the trust bucket; every step bounded by ``--timeout``."""
    import asyncio

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.client import MeshError, open_mesh
    from mesh.names import TRUST_BUCKET

    opts = settings(ctx)

    async def run() -> T:
        async with open_mesh(opts.profile, opts.timeout) as mesh:
            kv = await mesh.bucket(TRUST_BUCKET)
            try:
                return await asyncio.wait_for(action(kv), opts.timeout)
            except (NatsError, JsError, TimeoutError) as exc:
                raise MeshError(
                    f"trust bucket: {mesh.explain(exc)} (timeout {opts.timeout:g}s)"
                ) from None

    try:
        return asyncio.run(run())
    except MeshError as exc:
        fail(str(exc))


async def _entries(kv: KeyValue) -> list[bytes]:
    from agent.commands.marks import live_entries

    return [e.value for e in await live_entries(kv, "ca.*") if e.value]


@click.group()
def trust() -> None:
    """The trust bundle: every trusted site's public CA certificate."""


@trust.command("add")
@click.argument("file", type=click.File("rb"))
@mesh_options(timeout="5s")
@click.pass_context
def trust_add(ctx: click.Context, file: Any) -> None:
    """Trust a site's CA certificate FILE (PEM); every agent reloads its bundle."""
    from mesh.names import trust_key
    from mesh.trust import TrustError, fingerprint, load_ca_certificate, site_of, trust_entry

    try:
        cert = load_ca_certificate(file.read(), file.name)
        site = site_of(cert)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)

    async def put(kv: KeyValue) -> int:
        return await kv.put(trust_key(site), trust_entry(cert))

    _with_trust(ctx, put)
    click.echo(f"trusted {site} {fingerprint(cert)}")


@trust.command("revoke")
@click.argument("site", shell_complete=complete_sites)
@mesh_options(timeout="5s")
@click.pass_context
def trust_revoke(ctx: click.Context, site: str) -> None:
    """Remove SITE's CA from every bundle; its servers can no longer connect."""
    from nats.js.errors import KeyNotFoundError

    from mesh.names import trust_key

    async def delete(kv: KeyValue) -> bool:
        try:
            await kv.get(trust_key(site))
        except KeyNotFoundError:
            return False
        await kv.delete(trust_key(site))
        return True

    if not _with_trust(ctx, delete):
        fail(f"site {site!r} is not in the trust bundle", EXIT_BAD_INPUT)
    click.echo(f"revoked {site}")


@trust.command("list")
@mesh_options(timeout="5s")
@click.pass_context
def trust_list(ctx: click.Context) -> None:
    """One line per trusted site: fingerprint and expiry."""
    for raw in _with_trust(ctx, _entries):
        data = json.loads(raw)
        click.echo(f"{data['site']:<20} {data['fingerprint']}  not after {data['not_after']}")


@trust.command("bundle")
@mesh_options(timeout="5s")
@click.pass_context
def trust_bundle(ctx: click.Context) -> None:
    """Print the bundle (PEM), as every agent writes it for its nats-server."""
    from mesh.trust import bundle

    sys.stdout.buffer.write(bundle(_with_trust(ctx, _entries)))
