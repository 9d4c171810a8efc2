"""``harmony-agent status``: the whole mesh at a glance, from the KV buckets.

``-o json`` is a stable interface (CONTRACT section 6): fields are only ever added, and it
always lists everything. The table is built from the very same document, so the two never
disagree; with many applications or agents it summarises (``--all`` lists every one).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import fail
from agent.cli.options import mesh_options, output_option, settings

if TYPE_CHECKING:
    from agent.cli.profile import Profile
    from agent.commands.client import MeshClient
    from agent.meshview import MeshSnapshot, MeshState

WATCH_DEBOUNCE = 0.1
WATCH_TICK = 1.0


def _age(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else round((now - then).total_seconds(), 3)


def status_document(snap: MeshSnapshot, now: datetime) -> dict[str, Any]:
    """The ``status -o json`` object (CONTRACT section 6, plus extra fields)."""
    from agent.meshview import rfc3339

    agents = sorted(snap.agents.values(), key=lambda a: a.id)
    healthy = {a.id: a.healthy(now) for a in agents}
    apps: list[dict[str, Any]] = []
    for name, app in sorted(snap.apps.items()):
        lease = snap.lease_of(name)
        fence = snap.fences.get(name)
        apps.append(
            {
                "name": name,
                "trait": app.trait,
                "strategy": app.strategy,
                "reconcile": app.reconcile,
                "sites": list(app.sites),
                "score": app.score,
                "holder": lease.holder if lease else None,
                "fencing_token": lease.token if lease else None,
                "lease_state": lease.state if lease else None,
                "handover_to": lease.handover_to if lease else None,
                "lease_age": _age(now, lease.written) if lease else None,
                "holder_healthy": healthy.get(lease.holder or "") if lease else None,
                "slots": [
                    {
                        "site": s.site,
                        "holder": s.holder,
                        "fencing_token": s.token,
                        "lease_state": s.state,
                        "lease_age": _age(now, s.written),
                        "holder_healthy": healthy.get(s.holder or "", False),
                    }
                    for s in snap.slots_of(name)
                ],
                "fenced": fence is not None,
                "fence": fence.as_dict() if fence else None,
                "instances": [
                    {
                        "agent": i.agent,
                        "state": i.state,
                        "token": i.token,
                        "detail": i.detail,
                        "stale": i.stale,
                        "pid": i.pid,
                        "partitioned": i.partitioned,
                        "deadline_enforced": i.deadline_enforced,
                        "role": i.role,
                        "timeline": i.timeline,
                        "lag_bytes": i.lag_bytes,
                        "position": i.position,
                        "replication_detail": i.replication_detail,
                        "error": i.error,
                    }
                    for i in snap.instances_of(name, now)
                ],
            }
        )
    known = set(snap.apps)
    problems = list(snap.problems)
    for a in agents:
        problems += [f"{a.id}: certificate {w}" for w in a.warnings]
    for lease in sorted(snap.leases.values(), key=lambda v: v.key):
        if lease.app not in known:
            problems.append(f"harmony-leases {lease.key}: lease of an unknown application")
    return {
        "generated_at": rfc3339(now),
        "sites": [
            {
                "name": site,
                "drained": site in snap.drains,
                "drain": snap.drains[site].as_dict() if site in snap.drains else None,
                "agents": sum(1 for a in agents if a.site == site),
                "healthy_agents": sum(1 for a in agents if a.site == site and healthy[a.id]),
            }
            for site in snap.sites()
        ],
        "agents": [
            {
                "id": a.id,
                "site": a.site,
                "node": a.node,
                "last_seen": rfc3339(a.last_seen),
                "healthy": healthy[a.id],
                "in_quorum": a.in_quorum(now),
                "state": a.state,
                "age": _age(now, a.last_seen),
                "ttl": a.ttl,
                "version": a.version,
                "epoch": a.epoch,
                "ready": a.health.get("ready") is True,
                "connected": a.health.get("connected") is True,
                "started_at": a.started_at,
                "topology": a.topology,
                "drained": a.site in snap.drains,
            }
            for a in agents
        ],
        "applications": apps,
        "trust": [
            {
                "site": t.site,
                "fingerprint": t.fingerprint,
                "not_after": t.not_after,
                "revision": t.revision,
                "state": t.state,
                "detail": t.detail,
            }
            for _, t in sorted(snap.trust.items())
        ],
        "problems": problems,
    }


def _now() -> datetime:
    return datetime.now(UTC)


async def _once(profile: Profile, timeout: float) -> dict[str, Any]:
    import asyncio

    from agent.commands.client import open_mesh

    async with open_mesh(profile, timeout) as mesh:
        state = await asyncio.wait_for(mesh.read(), timeout)
        return status_document(state.snapshot(), _now())


async def _watch(profile: Profile, timeout: float, output: str, view: View) -> None:
    """Follow the buckets with KV watches; re-render on change (debounced) and each second
    (ages and health move with time even when nothing is written, e.g. a dead agent)."""
    import asyncio

    from agent.commands.client import open_mesh
    from agent.meshview import MeshState

    async with open_mesh(profile, timeout) as mesh:
        state = MeshState()
        changed = asyncio.Event()
        followers = await mesh.follow(state, on_change=changed.set)
        await asyncio.wait_for(asyncio.gather(*(f.initial for f in followers)), timeout)
        try:
            await _watch_loop(mesh, state, changed, output, view)
        finally:
            for f in followers:
                await f.stop()


async def _watch_loop(
    mesh: MeshClient, state: MeshState, changed: Any, output: str, view: View
) -> None:
    """On a terminal, a dashboard redrawn in place; into a pipe, a new snapshot only when
    something other than ages and timestamps changed (JSON Lines with ``-o json``)."""
    import asyncio
    import contextlib
    import sys

    from agent.cli.status_render import stable
    from agent.commands.client import MeshError

    live = sys.stdout.isatty() and output != "json"
    if live:
        sys.stdout.write("\x1b[2J")  # clear once; each frame then redraws from home
    last: Any = None
    while True:
        if not mesh.nc.is_connected:
            raise MeshError("lost the connection to the mesh")
        doc = status_document(state.snapshot(), _now())
        key = stable(doc)
        if live:
            # Home, draw, clear what is left of the previous frame below.
            sys.stdout.write("\x1b[H" + _table(doc, view).replace("\n", "\x1b[K\n") + "\x1b[J")
            sys.stdout.flush()
        elif key != last:
            _emit(doc, output, view, watch=True)
        last = key
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), WATCH_TICK)
            await asyncio.sleep(WATCH_DEBOUNCE)  # coalesce a burst of writes
        changed.clear()


@dataclass(frozen=True)
class View:
    """How the table is drawn: ``wide`` columns, ``full``: every row even at scale."""

    wide: bool
    full: bool


def _color() -> bool:
    """Colours only on a terminal, and never with NO_COLOR set (no-color.org)."""
    import os
    import sys

    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _table(doc: dict[str, Any], view: View) -> str:
    from agent.cli.status_render import draw, render

    return draw(render(doc, wide=view.wide, full=view.full), _color())


def _emit(doc: dict[str, Any], output: str, view: View, *, watch: bool = False) -> None:
    import json
    import sys

    if output == "json":
        text = json.dumps(doc, separators=(",", ":")) if watch else json.dumps(doc, indent=2)
    else:
        text = (f"--- {doc['generated_at']}\n" if watch else "") + _table(doc, view)
    click.echo(text)
    sys.stdout.flush()


@click.command()
@output_option(
    ["table", "wide", "json"],
    "table",
    "table: summary; wide: more columns; json: the stable schema of docs/cli.md.",
)
@click.option(
    "-w", "--watch", is_flag=True, help="Keep following the mesh (KV watches) and re-render."
)
@click.option(
    "-A",
    "--all",
    "show_all",
    is_flag=True,
    help="List every application and agent; by default a mesh with more than 50 is "
    "summarised (counts per state, then only the ones not running or not healthy).",
)
@mesh_options(timeout="5s")
@click.pass_context
def status(ctx: click.Context, watch: bool, show_all: bool) -> None:
    """Show sites, agents, applications and trust, as the mesh stores them."""
    import asyncio
    import contextlib

    from agent.commands.client import MeshError

    opts = settings(ctx)
    view = View(wide=opts.output == "wide", full=show_all)
    try:
        if watch:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_watch(opts.profile, opts.timeout, opts.output, view))
            return
        doc = asyncio.run(_once(opts.profile, opts.timeout))
    except MeshError as exc:
        fail(str(exc))
    except TimeoutError:
        fail(f"the mesh at {opts.profile.where} did not answer within {opts.timeout:g}s")
    _emit(doc, opts.output, view)
