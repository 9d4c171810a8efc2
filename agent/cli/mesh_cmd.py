"""``harmony-agent mesh init|show``: create the mesh's buckets and lease stores, and look.

Why a command: leases live in one single-replica store per site (docs/leases.md), and every
agent must decide over the same list of stores. The first agent with ``mesh.stores`` in its
configuration can write that list (the mesh descriptor); where agents run without
JetStream admin rights (``mesh.bootstrap: false``, the secure deployment of
docs/security.md) an administrator runs ``mesh init`` once instead, with admin credentials.
``show`` answers the operator's first question after a failure: which stores exist, where
each is placed, and which server leads each replicated stream.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.cli.options import mesh_options, output_option, settings
from agent.patterns import SITE_PATTERN

if TYPE_CHECKING:
    from agent.cli.profile import Profile


def _stores(value: str) -> list[str]:
    import re

    stores = [s.strip() for s in value.split(",") if s.strip()]
    if not stores:
        fail("--stores: name at least one store (one site name each)", EXIT_BAD_INPUT)
    for name in stores:
        if not re.match(SITE_PATTERN, name):
            fail(f"--stores: {name!r} is not a site name ([a-z0-9-]{{1,63}})", EXIT_BAD_INPUT)
    if len(set(stores)) != len(stores):
        fail("--stores: a store is named twice", EXIT_BAD_INPUT)
    return stores


async def _init(profile: Profile, timeout: float, stores: list[str], replicas: int) -> str:
    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.client import MeshError, open_mesh
    from mesh.bootstrap import MeshMismatch, ensure_mesh

    async with open_mesh(profile, timeout) as client:
        js = client.nc.jetstream(timeout=max(timeout, 10.0))
        try:
            mesh = await ensure_mesh(js, replicas, stores=stores)
        except MeshMismatch as exc:
            raise MeshError(str(exc)) from None
        except (NatsError, JsError, TimeoutError) as exc:
            raise MeshError(f"cannot create the mesh: {client.explain(exc)}") from None
    return (
        f"mesh ready: lease stores {', '.join(mesh.descriptor.stores)}; "
        f"harmony-state, harmony-trust and harmony-events at R{mesh.replicas}"
    )


async def _describe(profile: Profile, timeout: float) -> dict[str, Any]:
    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.client import MeshError, open_mesh
    from mesh.descriptor import read_descriptor
    from mesh.names import EVENTS_STREAM, STATE_BUCKET, TRUST_BUCKET, store_bucket

    async with open_mesh(profile, timeout) as client:
        try:
            state = await client.bucket(STATE_BUCKET)
            desc = await read_descriptor(state)
        except (NatsError, JsError, TimeoutError) as exc:
            raise MeshError(f"cannot read the mesh: {client.explain(exc)}") from None
        if desc is None:
            raise MeshError("the mesh has no descriptor yet: run `harmony-agent mesh init`")
        streams = [f"KV_{STATE_BUCKET}", f"KV_{TRUST_BUCKET}", EVENTS_STREAM]
        streams += [f"KV_{store_bucket(s)}" for s in desc.stores]
        rows = []
        for name in streams:
            row: dict[str, Any] = {"stream": name}
            try:
                info = await client.js.stream_info(name)
            except (NatsError, JsError, TimeoutError) as exc:
                row["error"] = client.explain(exc)
                rows.append(row)
                continue
            cluster = info.cluster
            placement = info.config.placement
            row.update(
                replicas=info.config.num_replicas,
                leader=cluster.leader if cluster else None,
                replicas_current=[r.name for r in (cluster.replicas or []) if cluster and r.current]
                if cluster
                else [],
                tags=list(placement.tags or []) if placement else [],
                messages=info.state.messages,
            )
            rows.append(row)
    return {"stores": list(desc.stores), "created": desc.created_at, "streams": rows}


@click.group("mesh")
def mesh() -> None:
    """Create the mesh's buckets and lease stores, and show where they live."""


@mesh.command("init")
@click.option(
    "--stores",
    "stores_text",
    required=True,
    metavar="SITE,SITE,...",
    help="One lease store per site (an odd number: 3 or 5 failure domains).",
)
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=3,
    show_default=True,
    help="Replicas of harmony-state, harmony-trust and harmony-events.",
)
@mesh_options(timeout="30s")
@click.pass_context
def init(ctx: click.Context, stores_text: str, replicas: int) -> None:
    """Create every bucket, stream and lease store (idempotent; needs JetStream admin)."""
    from agent.commands.client import MeshError
    from agent.logs import configure

    stores = _stores(stores_text)
    opts = settings(ctx)
    configure("warning")  # the bootstrap's own progress lines are for agents' logs
    try:
        click.echo(asyncio.run(_init(opts.profile, opts.timeout, stores, replicas)))
    except MeshError as exc:
        fail(str(exc))


@mesh.command("show")
@output_option(("table", "json"), "table")
@mesh_options(timeout="5s")
@click.pass_context
def show(ctx: click.Context) -> None:
    """The lease stores, and each stream's placement, leader and size."""
    import json

    from agent.commands.client import MeshError

    opts = settings(ctx)
    output = opts.output
    try:
        info = asyncio.run(_describe(opts.profile, opts.timeout))
    except MeshError as exc:
        fail(str(exc))
    if output == "json":
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"lease stores: {', '.join(info['stores'])} (since {info['created']})")
    click.echo(f"{'STREAM':<28} {'R':>1}  {'LEADER':<20} {'CURRENT':<30} {'TAGS':<14} MSGS")
    for row in info["streams"]:
        if "error" in row:
            click.echo(f"{row['stream']:<28} !  {row['error']}")
            continue
        click.echo(
            f"{row['stream']:<28} {row['replicas']:>1}  {row['leader'] or '-':<20} "
            f"{','.join(row['replicas_current']) or '-':<30} {','.join(row['tags']) or '-':<14} "
            f"{row['messages']}"
        )
