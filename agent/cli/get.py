"""``harmony-agent get app [NAME]``: the stored Application, as ``apply`` takes it back.

Printed exactly as the mesh stores it (``app.<name>`` in ``harmony-state``, defaults
filled in), so ``get app -o yaml > apps.yaml`` and ``apply -f apps.yaml`` round-trip.
Without NAME every application is printed (YAML documents, or a JSON list).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.cli.completion_names import complete_apps
from agent.cli.options import mesh_options, output_option, settings
from agent.patterns import NAME_PATTERN

if TYPE_CHECKING:
    from agent.cli.profile import Profile


async def stored_apps(profile: Profile, timeout: float, name: str | None) -> list[Any]:
    """The stored documents (decoded JSON), one or all, sorted by name."""
    import asyncio
    import json

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError
    from nats.js.errors import KeyNotFoundError

    from agent.commands.client import MeshError, open_mesh
    from agent.commands.marks import live_entries
    from mesh.names import STATE_BUCKET, app_key

    async with open_mesh(profile, timeout) as mesh:
        kv = await mesh.bucket(STATE_BUCKET)
        try:
            if name is not None:
                try:
                    raws = [(await asyncio.wait_for(kv.get(app_key(name)), timeout)).value]
                except KeyNotFoundError:
                    raise MeshError(f"application {name!r} not found") from None
            else:
                entries = await asyncio.wait_for(live_entries(kv, "app.*"), timeout)
                raws = [e.value for e in sorted(entries, key=lambda e: e.key)]
        except (NatsError, JsError, TimeoutError) as exc:
            raise MeshError(f"read failed: {mesh.explain(exc)}") from None
    docs: list[Any] = []
    for raw in raws:
        try:
            docs.append(json.loads(raw or b""))
        except ValueError:
            docs.append((raw or b"").decode("utf-8", errors="replace"))
    return docs


@click.group()
def get() -> None:
    """Print a stored resource (get app NAME)."""


@get.command("app")
@click.argument("name", required=False, shell_complete=complete_apps)
@output_option(["yaml", "json"], "yaml", "yaml (what apply reads) or json.")
@mesh_options(timeout="5s")
@click.pass_context
def get_app(ctx: click.Context, name: str | None) -> None:
    """Print the stored Application NAME (every application without NAME)."""
    import asyncio
    import json
    import re

    from agent.commands.client import MeshError

    if name is not None and not re.match(NAME_PATTERN, name):
        fail(f"NAME: {name!r} is not a valid application name ([a-z0-9-]{{1,63}})", EXIT_BAD_INPUT)
    opts = settings(ctx)
    try:
        docs = asyncio.run(stored_apps(opts.profile, opts.timeout, name))
    except MeshError as exc:
        fail(str(exc))
    if opts.output == "json":
        click.echo(json.dumps(docs[0] if name else docs, indent=2))
        return
    import yaml

    click.echo(yaml.safe_dump_all(docs, sort_keys=False, explicit_start=len(docs) > 1), nl=False)
