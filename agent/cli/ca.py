"""``harmony-agent ca`` (this site's CA, the trust-admin key, server accounts) and
``harmony-agent trust`` (the signed, federated bundle).

The site CA key lives in ``--dir`` (default ``/etc/harmony-agent/ca``, 0700, outside the
agent's state directory, root only); the trust-admin key is created offline and only ever
read by ``trust add`` / ``trust revoke`` on the admin's machine: neither is stored in the
mesh. ``trust`` talks to the mesh like every other command: the connection options (TLS
files, credentials, a context), a deadline (``--timeout``, default 5s) on the connection
and on every read and write, one line when anything fails.
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
    from cryptography import x509
    from nats.js.kv import KeyValue

T = TypeVar("T")
DEFAULT_CA_DIR = "/etc/harmony-agent/ca"
"""Outside the agent's state directory (root only): workloads must not read the key."""
ADMIN_PUBLIC_KEY_ENV = "HARMONY_TRUST_ADMIN_PUBLIC_KEY"


def ca_dir_option(func: Any) -> Any:
    return click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: Path(os.environ.get("HARMONY_CA_DIR", DEFAULT_CA_DIR)),
        show_default="$HARMONY_CA_DIR or " + DEFAULT_CA_DIR,
        help="Where this site's CA lives (0700, root only; the key never leaves it).",
    )(func)


def admin_key_option(func: Any) -> Any:
    return click.option(
        "--admin-key",
        "admin_key",
        type=click.Path(dir_okay=False, path_type=Path),
        required=True,
        help="The trust-admin private key (from `ca trust-admin-init`, kept offline).",
    )(func)


def admin_public_key_option(func: Any) -> Any:
    return click.option(
        "--admin-public-key",
        "admin_public_key",
        default=lambda: os.environ.get(ADMIN_PUBLIC_KEY_ENV),
        show_default="$" + ADMIN_PUBLIC_KEY_ENV,
        help="ed25519:<base64>: verify signatures (without it, entries show as unverified).",
    )(func)


@click.group()
def ca() -> None:
    """This site's certificate authority.

    ECDSA P-256, valid 10 years; it issues leaf certificates of 90 days.
    """


@ca.command("init")
@click.option("--site", required=True, help="The site this CA speaks for (its OU).")
@ca_dir_option
def ca_init(site: str, directory: Path) -> None:
    """Create the site's root CA (once), key 0600 in a 0700 directory."""
    from mesh.trust import SiteCA, TrustError, fingerprint

    try:
        authority = SiteCA.create(site, directory)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        fail(f"{directory}: {exc.strerror}", EXIT_BAD_INPUT)
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
    """Issue (or renew: run it again) leaf NAME for a nats-server or an agent.

    An agent's leaf is named after its node (``CN=<node>,OU=<site>``: its NATS user); a
    server's carries the DNS name other sites' route URLs use. Files are replaced
    atomically, key first, so a reloading server never sees half of a pair.
    """
    from mesh.trust import SiteCA, TrustError, rfc3339

    try:
        authority = SiteCA.load(directory)
        cert, key_pem = authority.issue(name, dns=list(dns), ips=list(ip), days=days)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    out.mkdir(parents=True, exist_ok=True)
    write_leaf(out / f"{name}.crt", out / f"{name}.key", cert, key_pem, authority.cert)
    click.echo(f"issued {out / (name + '.crt')} (key {out / (name + '.key')}, 0600)")
    click.echo(f"not after {rfc3339(cert.not_valid_after_utc)}")


def write_leaf(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key_pem: bytes, ca: x509.Certificate
) -> None:
    """Replace a leaf pair: key then certificate (with its CA, the chain peers receive)."""
    from mesh.trust import cert_pem, write_atomically, write_private

    tmp = key_path.with_name(key_path.name + ".tmp")
    write_private(tmp, key_pem)
    os.replace(tmp, key_path)
    write_atomically(cert_path, cert_pem(cert) + cert_pem(ca))


@ca.command("renew")
@click.argument("cert", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Renew even before 2/3 of its life.")
@ca_dir_option
def ca_renew(cert: Path, key: Path, force: bool, directory: Path) -> None:
    """Renew leaf CERT/KEY (same name and SANs, new key) once 2/3 of its life has passed.

    For a timer run as root where the agent may not read the CA key; the running agent
    notices the new files, reloads its nats-server and reconnects with them.
    """
    from mesh.rotation import leaf_of, renew_leaf, renew_time, renewal_due
    from mesh.trust import SiteCA, TrustError, rfc3339

    try:
        old = leaf_of(cert)
        if not force and not renewal_due(old):
            click.echo(f"{cert}: not due before {rfc3339(renew_time(old))}")
            return
        new = renew_leaf(SiteCA.load(directory), cert, key)
    except (TrustError, OSError, ValueError, IndexError) as exc:
        fail(f"{cert}: {exc}", EXIT_BAD_INPUT)
    until = rfc3339(new.not_valid_after_utc)
    click.echo(f"renewed {cert} (serial {new.serial_number:x}), not after {until}")


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


@ca.command("trust-admin-init")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def ca_trust_admin_init(out: Path) -> None:
    """Create the trust-admin Ed25519 key (offline, once); print its public key.

    Give the public key to every agent (``trust.admin_public_key``); keep the private key
    off the mesh (an offline machine, a hardware token, a safe).
    """
    from mesh.trust import TrustError, create_admin_key

    try:
        public = create_admin_key(out)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    click.echo(f"created {out / 'trust-admin.key'} (0600; keep it offline)")
    click.echo(f"public key {public}")
    click.echo("agents: trust.admin_public_key: " + public)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@ca.command("accounts")
@click.option("--site", required=True, help="The site whose servers this is for.")
@click.option("--stores", required=True, help="Lease stores, comma-separated (the descriptor's).")
@click.option("--agents", default="", help="This site's agent nodes, comma-separated.")
@click.option("--operators", default="", help="Operator user names, comma-separated.")
@click.option("--viewers", default="", help="Viewer user names, comma-separated.")
@click.option("--trust-admins", default="", help="Trust-admin user names, comma-separated.")
@click.option("--admins", default="", help="JetStream admin user names, comma-separated.")
def ca_accounts(
    site: str,
    stores: str,
    agents: str,
    operators: str,
    viewers: str,
    trust_admins: str,
    admins: str,
) -> None:
    """Print the nats-server ``accounts`` block for SITE's servers (include it in their
    config, next to ``tls { verify_and_map: true }``)."""
    from mesh.authz import AuthzError, MeshNames, Roles, render_accounts

    try:
        text = render_accounts(
            MeshNames(stores=_csv(stores)),
            Roles(
                site=site,
                agents=_csv(agents),
                operators=_csv(operators),
                viewers=_csv(viewers),
                trust_admins=_csv(trust_admins),
                admins=_csv(admins),
            ),
        )
    except AuthzError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    click.echo(text, nl=False)


# --- the mesh side -----------------------------------------------------------------------


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


async def _entries(kv: KeyValue) -> list[tuple[str, bytes]]:
    """Every live ``ca.*`` entry as (key, value), sorted by key."""
    from agent.commands.marks import live_entries

    entries = await live_entries(kv, "ca.*")
    return sorted((e.key, e.value) for e in entries if e.value)


async def _current_serial(kv: KeyValue, key: str) -> int | None:
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    try:
        data = json.loads(entry.value or b"{}")
        serial = data.get("serial") if isinstance(data, dict) else None
    except (ValueError, RecursionError):
        return None
    return serial if isinstance(serial, int) else None


@click.group()
def trust() -> None:
    """The trust bundle: every trusted site's public CA certificate.

    Every entry is signed by the trust-admin key (kept offline); agents use only entries
    that verify.
    """


@trust.command("add")
@click.argument("file", type=click.File("rb"))
@admin_key_option
@mesh_options(timeout="5s")
@click.pass_context
def trust_add(ctx: click.Context, file: Any, admin_key: Path) -> None:
    """Trust a site's CA certificate FILE (PEM), stored at ``ca.<its OU>`` and signed."""
    from mesh.names import trust_key
    from mesh.trust import (
        TrustError,
        fingerprint,
        load_admin_key,
        load_ca_certificate,
        next_serial,
        sign_entry,
        site_of,
    )

    try:
        cert = load_ca_certificate(file.read(), file.name)
        site = site_of(cert)
        key = load_admin_key(admin_key)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)

    async def put(kv: KeyValue) -> int:
        serial = next_serial(await _current_serial(kv, trust_key(site)))
        return await kv.put(trust_key(site), sign_entry(site, cert, key, serial))

    _with_trust(ctx, put)
    click.echo(f"trusted {site} {fingerprint(cert)}")


@trust.command("revoke")
@click.argument("site", shell_complete=complete_sites)
@admin_key_option
@mesh_options(timeout="5s")
@click.pass_context
def trust_revoke(ctx: click.Context, site: str, admin_key: Path) -> None:
    """Evict SITE: a signed tombstone; only a newer signed entry can bring it back."""
    from nats.js.errors import KeyNotFoundError

    from mesh.names import trust_key
    from mesh.trust import Rejected, TrustError, load_admin_key, next_serial, sign_entry
    from mesh.trust import verify_entry as verify

    try:
        key = load_admin_key(admin_key)
        sign_entry(site, None, key, 0)  # validates the site name before connecting
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    public = key.public_key()

    async def tombstone(kv: KeyValue) -> str | None:
        try:
            entry = await kv.get(trust_key(site))
        except KeyNotFoundError:
            return "not in the trust bundle"
        try:
            current = verify(trust_key(site), entry.value or b"", public)
        except Rejected as exc:
            current = None
            click.echo(f"replacing an invalid entry ({exc.reason})", err=True)
        if current is not None and current.certificate is None:
            return "already revoked"
        serial = next_serial(await _current_serial(kv, trust_key(site)))
        await kv.put(trust_key(site), sign_entry(site, None, key, serial))
        return None

    problem = _with_trust(ctx, tombstone)
    if problem:
        fail(f"site {site!r} is {problem}", EXIT_BAD_INPUT)
    click.echo(f"revoked {site}")


def _admin_public(text: str | None) -> Any:
    from mesh.trust import TrustError, parse_admin_public_key

    if text is None:
        return None
    try:
        return parse_admin_public_key(text)
    except TrustError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


@trust.command("list")
@admin_public_key_option
@mesh_options(timeout="5s")
@click.pass_context
def trust_list(ctx: click.Context, admin_public_key: str | None) -> None:
    """One line per entry: site (from the key), state, fingerprint computed from the
    certificate, expiry."""
    from mesh.trust import describe

    admin = _admin_public(admin_public_key)
    for key, raw in _with_trust(ctx, _entries):
        view = describe(key, raw, admin)
        fp = view.fingerprint or "-"
        until = f"not after {view.not_after}" if view.not_after else ""
        click.echo(f"{view.site or key:<20} {view.state:<22} {fp}  {until}".rstrip())


@trust.command("bundle")
@admin_public_key_option
@mesh_options(timeout="5s")
@click.pass_context
def trust_bundle(ctx: click.Context, admin_public_key: str | None) -> None:
    """Print the bundle (PEM) of the entries that verify, as every agent writes it."""
    from mesh.trust import Rejected, TrustState, verify_entry

    admin = _admin_public(admin_public_key)
    if admin is None:
        fail(f"--admin-public-key (or ${ADMIN_PUBLIC_KEY_ENV}) is required", EXIT_BAD_INPUT)
    state = TrustState()
    for key, raw in _with_trust(ctx, _entries):
        try:
            state.apply(verify_entry(key, raw, admin))
        except Rejected as exc:
            click.echo(f"ignored {key}: {exc.reason}: {exc.detail}", err=True)
    sys.stdout.buffer.write(state.bundle())
