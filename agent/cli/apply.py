"""``harmony-agent apply`` and ``delete``: store Applications in the mesh, or remove them.

Validation happens entirely before the first write, so a file with one bad document
changes nothing (exit 2). Writes are compare-and-set per key: two operators applying at
once cannot silently overwrite each other's concurrent edit, and re-applying the same file
is a no-op that prints ``unchanged``.
"""

from __future__ import annotations

import asyncio
import sys

import click
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from agent.application import NAME_PATTERN, Application, ApplicationError, parse_documents
from agent.cli.common import EXIT_BAD_INPUT, fail, parse_timeout, server_option, servers
from agent.commands.client import MeshError, open_mesh
from mesh.names import STATE_BUCKET, app_key


def read_source(path: str) -> tuple[str, str]:
    """(text, label) of ``-f``; ``-`` is stdin. Exit 2 when unreadable."""
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(), path
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}", EXIT_BAD_INPUT)


def load_applications(path: str) -> list[Application]:
    text, label = read_source(path)
    try:
        return parse_documents(text, label)
    except ApplicationError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


async def _current(kv: KeyValue, name: str) -> tuple[Application | None, int | None]:
    try:
        entry = await kv.get(app_key(name))
    except KeyNotFoundError:
        return None, None
    try:
        return Application.from_json(entry.value or b""), entry.revision
    except ValueError:
        return None, entry.revision  # unreadable: overwrite it


async def store(kv: KeyValue, app: Application, *, dry_run: bool) -> str:
    """Create or update one Application by CAS; returns created/updated/unchanged."""
    for _ in range(5):
        current, revision = await _current(kv, app.name)
        if current == app:
            return "unchanged"
        verdict = "created" if revision is None else "updated"
        if dry_run:
            return verdict
        try:
            if revision is None:
                await kv.create(app_key(app.name), app.to_json())
            else:
                await kv.update(app_key(app.name), app.to_json(), last=revision)
        except KeyWrongLastSequenceError:
            continue  # changed under us: compare again against the new value
        return verdict
    raise MeshError(f"{app.name}: changed concurrently by someone else; try again")


async def _apply(urls: list[str], timeout: float, apps: list[Application], dry_run: bool) -> None:
    async with open_mesh(urls, timeout) as mesh:
        kv = await mesh.bucket(STATE_BUCKET)
        suffix = " (dry run)" if dry_run else ""
        for app in apps:
            try:
                verdict = await asyncio.wait_for(store(kv, app, dry_run=dry_run), timeout)
            except (NatsError, JsError, TimeoutError) as exc:
                raise MeshError(f"{app.name}: write failed: {mesh.explain(exc)}") from None
            click.echo(f"application/{app.name} {verdict}{suffix}")


@click.command()
@click.option(
    "-f",
    "--filename",
    "path",
    required=True,
    help="YAML file with one or more Application documents; - reads stdin.",
)
@server_option
@click.option("--dry-run", is_flag=True, help="Validate and compare, but write nothing.")
@click.option("--timeout", default="5s", show_default=True, help="Mesh deadline.")
def apply(path: str, server: str, dry_run: bool, timeout: str) -> None:
    """Validate Applications, then store them in the mesh (created/updated/unchanged)."""
    seconds = parse_timeout(timeout)
    apps = load_applications(path)
    try:
        asyncio.run(_apply(servers(server), seconds, apps, dry_run))
    except MeshError as exc:
        fail(str(exc))


async def _delete(urls: list[str], timeout: float, name: str) -> None:
    async with open_mesh(urls, timeout) as mesh:
        kv = await mesh.bucket(STATE_BUCKET)
        try:
            await asyncio.wait_for(kv.get(app_key(name)), timeout)
        except KeyNotFoundError:
            raise MeshError(f"application {name!r} not found") from None
        try:
            await asyncio.wait_for(kv.delete(app_key(name)), timeout)
        except (NatsError, JsError, TimeoutError) as exc:
            raise MeshError(f"{name}: delete failed: {mesh.explain(exc)}") from None
    click.echo(f"application/{name} deleted")


@click.command()
@click.argument("app")
@server_option
@click.option("--timeout", default="5s", show_default=True, help="Mesh deadline.")
def delete(app: str, server: str, timeout: str) -> None:
    """Remove an Application from the mesh; its agents stop it."""
    import re

    if not re.match(NAME_PATTERN, app):
        fail(f"APP: {app!r} is not a valid application name ([a-z0-9-]{{1,63}})", EXIT_BAD_INPUT)
    seconds = parse_timeout(timeout)
    try:
        asyncio.run(_delete(servers(server), seconds, app))
    except MeshError as exc:
        fail(str(exc))
