"""``harmony-agent apply`` and ``delete``: store Applications in the mesh, or remove them.

Validation happens entirely before the first write, so a file with one bad document
changes nothing (exit 2). Writes are compare-and-set per key: two operators applying at
once cannot silently overwrite each other's concurrent edit, and re-applying the same file
is a no-op that prints ``unchanged``. ``--diff`` writes nothing and prints a unified diff
of what is stored against the file, exiting like ``kubectl diff``: 0 no differences,
1 differences, 2 bad input, 3 the mesh failed.

Each application written (or deleted) is audited: ``harmony.audit.<user>.apply`` (or
``.delete``) with the application and the outcome, under the operator's own identity
(``agent.commands.audit``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import EXIT_BAD_INPUT, EXIT_RUNTIME, fail
from agent.cli.completion_names import complete_apps
from agent.cli.options import mesh_options, settings
from agent.patterns import NAME_PATTERN

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from agent.application import Application
    from agent.cli.profile import Profile
    from agent.commands.client import MeshClient

EXIT_DIFFERS = 1
EXIT_DIFF_FAILED = 3


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
    from agent.application import ApplicationError, parse_documents

    text, label = read_source(path)
    try:
        return parse_documents(text, label)
    except ApplicationError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


async def _current(kv: KeyValue, name: str) -> tuple[Application | None, int | None]:
    from nats.js.errors import KeyNotFoundError

    from agent.application import Application
    from mesh.names import app_key

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
    from nats.js.errors import KeyWrongLastSequenceError

    from agent.commands.client import MeshError
    from mesh.names import app_key

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


async def audit(mesh: MeshClient, profile: Profile, verb: str, fields: dict[str, Any]) -> None:
    """``harmony.audit.<user>.<verb>``; raises MeshError when the stream did not store it."""
    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.audit import Auditor
    from agent.commands.client import MeshError

    auditor = Auditor.of(profile.cert_file, profile.user)
    try:
        await auditor.publish(mesh.js, verb, fields, mesh.timeout)
    except (NatsError, JsError, TimeoutError) as exc:
        raise MeshError(
            f"{fields.get('app')}: {verb} done, but its audit event was not recorded: "
            f"{mesh.explain(exc)}"
        ) from None


async def _apply(profile: Profile, timeout: float, apps: list[Application], dry_run: bool) -> None:
    import asyncio

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.client import MeshError, open_mesh
    from mesh.names import STATE_BUCKET

    async with open_mesh(profile, timeout) as mesh:
        kv = await mesh.bucket(STATE_BUCKET)
        suffix = " (dry run)" if dry_run else ""
        for app in apps:
            try:
                verdict = await asyncio.wait_for(store(kv, app, dry_run=dry_run), timeout)
            except (NatsError, JsError, TimeoutError) as exc:
                if not dry_run:
                    with contextlib.suppress(MeshError):
                        await audit(mesh, profile, "apply", {"app": app.name, "outcome": "failed"})
                raise MeshError(f"{app.name}: write failed: {mesh.explain(exc)}") from None
            click.echo(f"application/{app.name} {verdict}{suffix}")
            if not dry_run:
                await audit(mesh, profile, "apply", {"app": app.name, "outcome": verdict})


def as_yaml(doc: Any) -> str:
    import yaml

    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


async def _stored_texts(profile: Profile, timeout: float, names: list[str]) -> dict[str, str]:
    """The stored form of each application, as YAML ('' when absent)."""
    import asyncio
    import json

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError
    from nats.js.errors import KeyNotFoundError

    from agent.commands.client import MeshError, open_mesh
    from mesh.names import STATE_BUCKET, app_key

    out: dict[str, str] = {}
    async with open_mesh(profile, timeout) as mesh:
        kv = await mesh.bucket(STATE_BUCKET)
        for name in names:
            try:
                entry = await asyncio.wait_for(kv.get(app_key(name)), timeout)
            except KeyNotFoundError:
                out[name] = ""
                continue
            except (NatsError, JsError, TimeoutError) as exc:
                raise MeshError(f"{name}: read failed: {mesh.explain(exc)}") from None
            try:
                out[name] = as_yaml(json.loads(entry.value or b""))
            except ValueError:
                out[name] = (entry.value or b"").decode("utf-8", errors="replace")
    return out


def diff(apps: list[Application], stored: dict[str, str], label: str) -> str:
    """A unified diff, stored (``a``) against the file (``b``), per application."""
    import difflib

    chunks: list[str] = []
    for app in apps:
        mine = as_yaml(app.model_dump(mode="json", by_alias=True))
        theirs = stored.get(app.name, "")
        if mine == theirs:
            continue
        old = f"mesh/application/{app.name}" if theirs else "/dev/null"
        chunks += difflib.unified_diff(
            theirs.splitlines(keepends=True),
            mine.splitlines(keepends=True),
            fromfile=old,
            tofile=f"{label}/application/{app.name}",
        )
    return "".join(chunks)


@click.command()
@click.option(
    "-f",
    "--filename",
    "path",
    required=True,
    help="YAML file with one or more Application documents; - reads stdin.",
)
@click.option("--dry-run", is_flag=True, help="Validate and compare, but write nothing.")
@click.option(
    "--diff",
    "show_diff",
    is_flag=True,
    help="Write nothing; print a unified diff of the stored Applications against the file "
    "(exit 0: no differences, 1: differences, 2: bad input, 3: mesh failure).",
)
@mesh_options(timeout="5s")
@click.pass_context
def apply(ctx: click.Context, path: str, dry_run: bool, show_diff: bool) -> None:
    """Validate Applications, then store them in the mesh.

    Each is reported created, updated or unchanged; nothing is written if any document is
    invalid.
    """
    import asyncio

    from agent.commands.client import MeshError

    opts = settings(ctx)
    apps = load_applications(path)
    if show_diff:
        try:
            stored = asyncio.run(_stored_texts(opts.profile, opts.timeout, [a.name for a in apps]))
        except MeshError as exc:
            fail(str(exc), EXIT_DIFF_FAILED)
        text = diff(apps, stored, "<stdin>" if path == "-" else path)
        click.echo(text, nl=False)
        sys.exit(EXIT_DIFFERS if text else 0)
    try:
        asyncio.run(_apply(opts.profile, opts.timeout, apps, dry_run))
    except MeshError as exc:
        fail(str(exc))


async def _delete(profile: Profile, timeout: float, name: str) -> None:
    import asyncio

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError
    from nats.js.errors import KeyNotFoundError

    from agent.commands.client import MeshError, open_mesh
    from mesh.names import STATE_BUCKET, app_key

    async with open_mesh(profile, timeout) as mesh:
        kv = await mesh.bucket(STATE_BUCKET)
        try:
            await asyncio.wait_for(kv.get(app_key(name)), timeout)
        except KeyNotFoundError:
            raise MeshError(f"application {name!r} not found") from None
        try:
            await asyncio.wait_for(kv.delete(app_key(name)), timeout)
        except (NatsError, JsError, TimeoutError) as exc:
            with contextlib.suppress(MeshError):
                await audit(mesh, profile, "delete", {"app": name, "outcome": "failed"})
            raise MeshError(f"{name}: delete failed: {mesh.explain(exc)}") from None
        click.echo(f"application/{name} deleted")
        await audit(mesh, profile, "delete", {"app": name, "outcome": "deleted"})


@click.command()
@click.argument("app", shell_complete=complete_apps)
@mesh_options(timeout="5s")
@click.pass_context
def delete(ctx: click.Context, app: str) -> None:
    """Remove an Application from the mesh; its agents stop it."""
    import asyncio
    import re

    from agent.commands.client import MeshError

    if not re.match(NAME_PATTERN, app):
        fail(f"APP: {app!r} is not a valid application name ([a-z0-9-]{{1,63}})", EXIT_BAD_INPUT)
    opts = settings(ctx)
    try:
        asyncio.run(_delete(opts.profile, opts.timeout, app))
    except MeshError as exc:
        fail(str(exc), EXIT_RUNTIME)
