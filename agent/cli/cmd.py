"""``harmony-agent cmd``: a thin client of the command plane (docs/commands.md).

drain/undrain/fence/resume/ping go to a healthy agent (they are mesh writes any agent
serves); failover goes to ``harmony.cmd.app.<name>.failover``, which only the holder
answers, once the CLI has checked that the application exists. Names are validated
locally (exit 2) so that a typo never reaches the mesh.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.cli.completion_names import complete_apps, complete_sites
from agent.cli.options import given, mesh_options, output_option, settings, via_option
from agent.patterns import NAME_PATTERN, NODE_PATTERN, SITE_PATTERN

if TYPE_CHECKING:
    from agent.cli.profile import Profile
    from agent.commands.client import MeshClient
    from agent.commands.reply import Reply

OUTPUTS = ["text", "json"]


def requester() -> str:
    """``user@host`` for the audit trail (``by`` in requests and marks)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def live_agents(mesh: MeshClient) -> list[str]:
    """Whom to ask, most recently heard from first: agents whose record in
    ``harmony-state`` says alive and healthy and was written within 2 x their ttl.

    This is ``status``'s health rule applied to routing only (a wrong guess costs one
    refused request and the next agent is asked); it reads the records directly so that
    ``cmd`` does not load the Application models ``agent.meshview`` decodes.
    """
    import json
    from datetime import UTC, datetime

    from agent.commands.marks import live_entries
    from mesh.names import STATE_BUCKET

    kv = await mesh.bucket(STATE_BUCKET)
    now = datetime.now(UTC)
    ranked: list[tuple[float, str]] = []
    for entry in await live_entries(kv, "agent.*.*"):
        try:
            record = json.loads(entry.value or b"")
            ttl = float(record.get("ttl", 10.0))
            health = record.get("health") or {}
        except (ValueError, TypeError, AttributeError):
            continue
        written: Any = entry.created  # a datetime in watches
        if not isinstance(written, datetime):
            continue
        age = (now - written).total_seconds()
        alive = record.get("state", "alive") == "alive" and health.get("healthy") is True
        if alive and age <= 2 * ttl:
            ranked.append((age, "/".join(entry.key.split(".")[1:3])))
    return [agent for _, agent in sorted(ranked)]


async def app_exists(mesh: MeshClient, app: str) -> bool:
    from nats.js.errors import KeyNotFoundError

    from mesh.names import STATE_BUCKET, app_key

    kv = await mesh.bucket(STATE_BUCKET)
    try:
        await kv.get(app_key(app))
    except KeyNotFoundError:
        return False
    return True


async def _failover(mesh: MeshClient, body: dict[str, Any], timeout: float) -> Reply:
    from agent.commands.client import MeshError
    from mesh.names import app_cmd_subject

    app = body["app"]
    if not await app_exists(mesh, app):
        raise MeshError(f"unknown application {app}")
    try:
        return await mesh.request(app_cmd_subject(app, "failover"), body, timeout)
    except MeshError as exc:
        if "no agent serves" not in str(exc):
            raise
        raise MeshError(
            f"{app}: no agent holds it now, so there is no running instance to move "
            "(see `harmony-agent status`)"
        ) from None


async def _send(
    profile: Profile, timeout: float, verb: str, body: dict[str, Any], via: str | None
) -> Reply:
    from agent.commands.client import MeshError, open_mesh
    from mesh.names import agent_cmd_subject

    async with open_mesh(profile, timeout) as mesh:
        if verb == "failover":
            return await _failover(mesh, body, timeout)
        targets = [via] if via else (await live_agents(mesh))[:3]
        if not targets:
            raise MeshError("no healthy agent in the mesh to serve the command")
        last: MeshError | None = None
        for agent_id in targets:
            site, _, node = agent_id.partition("/")
            try:
                return await mesh.request(agent_cmd_subject(site, node, verb), body, timeout)
            except MeshError as exc:
                last = exc  # that agent just went away: ask the next one
        assert last is not None
        raise last


def _names(apps: Any) -> str:
    return ", ".join(str(a) for a in apps)


def _drained(f: dict[str, Any]) -> str:
    site = f.get("site")
    moves, stops = f.get("moves"), f.get("stops")
    if not isinstance(moves, list) or not isinstance(stops, list):
        # An agent older than this CLI does not say what moves.
        return (
            f"site {site} drained: applications placed there move to another site of "
            "their placement, or stop where there is none"
        )
    if not moves and not stops:
        return f"site {site} drained: no application is placed there"
    said = []
    if moves:
        said.append(f"{_names(moves)} move{'s' if len(moves) == 1 else ''} to other sites")
    if stops:
        said.append(
            f"{_names(stops)} stop{'s' if len(stops) == 1 else ''} "
            "(no other undrained site in the placement)"
        )
    return f"site {site} drained: " + "; ".join(said) + f"; `cmd undrain {site}` lifts it"


def describe(verb: str, reply: Reply) -> str:
    f = reply.fields
    who = f" (by {f['by']} at {f['at']})" if f.get("by") and f.get("at") else ""
    changed = f.get("changed", True)
    match verb:
        case "drain":
            if not changed:
                return f"site {f.get('site')} was already drained{who}"
            return _drained(f)
        case "undrain":
            return f"site {f.get('site')} " + ("undrained" if changed else "was not drained")
        case "fence":
            if not changed:
                return f"{f.get('app')} was already fenced{who}"
            return f"{f.get('app')} fenced: stopped everywhere until `cmd resume {f.get('app')}`"
        case "resume":
            return f"{f.get('app')} " + ("resumed" if changed else "was not fenced")
        case "failover":
            app = f.get("app")
            detail = str(f.get("message") or f.get("detail") or "handover started")
            prefix = "" if detail.startswith(f"{app}:") else f"{app}: "
            return f"{prefix}{detail} (served by {f.get('agent')})"
    return f"ok (served by {f.get('agent')})"


def _via(ctx: click.Context) -> str | None:
    via: str | None = given(ctx).get("via")
    if via is not None:
        site, _, node = via.partition("/")
        check_name(site, SITE_PATTERN, "--via site")
        check_name(node, NODE_PATTERN, "--via node")
    return via


def _run(ctx: click.Context, verb: str, body: dict[str, Any]) -> None:
    import asyncio
    import json

    from agent.commands.client import MeshError

    opts = settings(ctx)
    via = _via(ctx)
    body = {**body, "by": requester()}
    try:
        reply = asyncio.run(_send(opts.profile, opts.timeout, verb, body, via))
    except MeshError as exc:
        fail(str(exc))
    if opts.output == "json":
        click.echo(json.dumps(json.loads(reply.encode()), indent=2))
    if not reply.ok:
        fail(f"{verb} refused by {reply.fields.get('agent', 'the mesh')}: {reply.error}")
    if opts.output != "json":
        click.echo(describe(verb, reply))


def check_name(value: str, pattern: str, what: str) -> str:
    if not re.match(pattern, value):
        fail(f"{what}: {value!r} is not a valid name ({pattern.strip('^$')})", EXIT_BAD_INPUT)
    return value


def verb_options(func: Any) -> Any:
    """What every ``cmd`` verb accepts, before or after its arguments."""
    func = mesh_options(timeout="10s")(func)
    func = via_option(func)
    return output_option(OUTPUTS, "text", "text, or the raw reply as JSON.")(func)


@click.group()
@verb_options
def cmd() -> None:
    """Operate the mesh: failover, drain/undrain, fence/resume, ping."""


@cmd.command()
@click.argument("app", shell_complete=complete_apps)
@click.option("--to", "to_site", default=None, metavar="SITE", help="Target site.")
@verb_options
@click.pass_context
def failover(ctx: click.Context, app: str, to_site: str | None) -> None:
    """Planned move of APP's active instance (no overlap, no waiting for expiry)."""
    body: dict[str, Any] = {"app": check_name(app, NAME_PATTERN, "APP")}
    if to_site is not None:
        body["to"] = check_name(to_site, SITE_PATTERN, "--to")
    _run(ctx, "failover", body)


@cmd.command()
@click.argument("site", shell_complete=complete_sites)
@click.option("--reason", default=None, help="Why (stored with the mark).")
@verb_options
@click.pass_context
def drain(ctx: click.Context, site: str, reason: str | None) -> None:
    """Move every application off SITE and keep them off (survives restarts)."""
    _run(ctx, "drain", {"site": check_name(site, SITE_PATTERN, "SITE"), "reason": reason})


@cmd.command()
@click.argument("site", shell_complete=complete_sites)
@verb_options
@click.pass_context
def undrain(ctx: click.Context, site: str) -> None:
    """Let applications run on SITE again."""
    _run(ctx, "undrain", {"site": check_name(site, SITE_PATTERN, "SITE")})


@cmd.command()
@click.argument("app", shell_complete=complete_apps)
@click.option("--reason", default=None, help="Why (stored with the mark).")
@verb_options
@click.pass_context
def fence(ctx: click.Context, app: str, reason: str | None) -> None:
    """Stop APP everywhere and hold it stopped."""
    _run(ctx, "fence", {"app": check_name(app, NAME_PATTERN, "APP"), "reason": reason})


@cmd.command()
@click.argument("app", shell_complete=complete_apps)
@verb_options
@click.pass_context
def resume(ctx: click.Context, app: str) -> None:
    """Lift a fence: APP may run again."""
    _run(ctx, "resume", {"app": check_name(app, NAME_PATTERN, "APP")})


@cmd.command()
@verb_options
@click.pass_context
def ping(ctx: click.Context) -> None:
    """Check that some agent's command plane answers."""
    _run(ctx, "ping", {})
