"""``harmony-agent mesh init``: the admin step that creates the mesh (SPEC v2 roles).

Under per-identity accounts (``mesh.authz``) agents may not create buckets or streams: an
admin creates ``harmony-state``, ``harmony-trust``, the ``harmony-events`` stream, one lease
store per name in ``--stores`` and the mesh descriptor, once, with their own identity.
Idempotent: run again, it binds to what exists and refuses a different store list.
"""

from __future__ import annotations

import re

import click

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.cli.options import mesh_options, settings
from agent.patterns import SITE_PATTERN


@click.group("mesh")
def mesh() -> None:
    """Create the mesh (admin): buckets, streams, lease stores, descriptor."""


@mesh.command("init")
@click.option(
    "--stores",
    default=None,
    metavar="SITE,...",
    help="The lease stores (normally the three site names); needed the first time.",
)
@click.option("--replicas", type=click.IntRange(1, 5), default=3, show_default=True)
@mesh_options(timeout="30s")
@click.pass_context
def init(ctx: click.Context, stores: str | None, replicas: int) -> None:
    """Create (or check) the buckets, the events stream, the lease stores and the descriptor."""
    import asyncio

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.client import MeshError, open_mesh
    from mesh.bootstrap import MeshMismatch, ensure_mesh

    names = [s.strip() for s in (stores or "").split(",") if s.strip()] or None
    for name in names or ():
        if not re.match(SITE_PATTERN, name):
            pattern = SITE_PATTERN.strip("^$")
            fail(f"--stores: {name!r} is not a site name ({pattern})", EXIT_BAD_INPUT)
    opts = settings(ctx)

    async def run() -> list[str]:
        async with open_mesh(opts.profile, opts.timeout) as client:
            try:
                made = await asyncio.wait_for(
                    ensure_mesh(client.js, replicas, stores=names), opts.timeout
                )
            except (NatsError, JsError, TimeoutError) as exc:
                raise MeshError(f"mesh init: {client.explain(exc)}") from None
            return made.stores

    try:
        made = asyncio.run(run())
    except MeshMismatch as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except MeshError as exc:
        fail(str(exc))
    click.echo(f"mesh ready: lease stores {', '.join(made)}")
