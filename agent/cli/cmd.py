"""``harmony-agent cmd``: a thin client of the command plane (docs/commands.md).

drain/undrain/fence/resume go to any live agent (they are mesh writes any agent serves);
failover goes to ``harmony.cmd.app.<name>.failover``, which only the holder answers. The
CLI validates names locally (exit 2) so that a typo never reaches the mesh.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
import socket
from typing import Any

import click

from agent.application import NAME_PATTERN
from agent.cli.common import EXIT_BAD_INPUT, fail, parse_timeout, server_option, servers
from agent.commands.client import MeshClient, MeshError, open_mesh
from agent.commands.marks import live_entries
from agent.commands.models import Reply
from agent.config import SITE_PATTERN
from agent.meshview import MeshState
from mesh.names import STATE_BUCKET, agent_cmd_subject, app_cmd_subject


def requester() -> str:
    """``user@host`` for the audit trail (``by`` in requests and marks)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def live_agents(mesh: MeshClient) -> list[str]:
    """Agent ids, healthy ones first (most recently seen first): whom to ask."""
    kv = await mesh.bucket(STATE_BUCKET)
    state = MeshState()
    for entry in await live_entries(kv, "agent.*.*"):
        state.apply(STATE_BUCKET, entry)
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    agents = list(state.snapshot().agents.values())
    healthy = [a for a in agents if a.healthy(now)]
    healthy.sort(key=lambda a: a.age(now) or 0.0)
    return [a.id for a in healthy]


async def _send(
    urls: list[str], timeout: float, verb: str, body: dict[str, Any], via: str | None
) -> Reply:
    async with open_mesh(urls, timeout) as mesh:
        if verb == "failover":
            return await mesh.request(app_cmd_subject(body["app"], verb), body, timeout)
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


def _describe(verb: str, reply: Reply) -> str:
    f = reply.fields
    who = f" (by {f['by']} at {f['at']})" if f.get("by") and f.get("at") else ""
    changed = f.get("changed", True)
    match verb:
        case "drain":
            if not changed:
                return f"site {f.get('site')} was already drained{who}"
            return f"site {f.get('site')} drained: its applications move to other sites"
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


def _run(ctx: click.Context, verb: str, body: dict[str, Any]) -> None:
    opts = ctx.obj
    body = {**body, "by": requester()}
    try:
        reply = asyncio.run(_send(opts["servers"], opts["timeout"], verb, body, opts["via"]))
    except MeshError as exc:
        fail(str(exc))
    if opts["output"] == "json":
        click.echo(json.dumps(json.loads(reply.encode()), indent=2))
    if not reply.ok:
        fail(f"{verb} refused by {reply.fields.get('agent', 'the mesh')}: {reply.error}")
    if opts["output"] != "json":
        click.echo(_describe(verb, reply))


def _name(value: str, pattern: str, what: str) -> str:
    if not re.match(pattern, value):
        fail(f"{what}: {value!r} is not a valid name ({pattern.strip('^$')})", EXIT_BAD_INPUT)
    return value


@click.group()
@server_option
@click.option("--timeout", default="10s", show_default=True, help="Reply deadline.")
@click.option("--via", default=None, metavar="SITE/NODE", help="Ask this agent.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def cmd(ctx: click.Context, server: str, timeout: str, via: str | None, output: str) -> None:
    """Operate the mesh: failover, drain/undrain a site, fence/resume an application."""
    seconds = parse_timeout(timeout)
    if via is not None:
        site, _, node = via.partition("/")
        _name(site, SITE_PATTERN, "--via site")
        _name(node, r"^[a-z0-9_-]{1,63}$", "--via node")
    ctx.obj = {"servers": servers(server), "timeout": seconds, "via": via, "output": output}


@cmd.command()
@click.argument("app")
@click.option("--to", "to_site", default=None, metavar="SITE", help="Target site.")
@click.pass_context
def failover(ctx: click.Context, app: str, to_site: str | None) -> None:
    """Planned move of APP's active instance (no overlap, no waiting for expiry)."""
    body: dict[str, Any] = {"app": _name(app, NAME_PATTERN, "APP")}
    if to_site is not None:
        body["to"] = _name(to_site, SITE_PATTERN, "--to")
    _run(ctx, "failover", body)


@cmd.command()
@click.argument("site")
@click.option("--reason", default=None, help="Why (stored with the mark).")
@click.pass_context
def drain(ctx: click.Context, site: str, reason: str | None) -> None:
    """Move every application off SITE and keep them off (survives restarts)."""
    _run(ctx, "drain", {"site": _name(site, SITE_PATTERN, "SITE"), "reason": reason})


@cmd.command()
@click.argument("site")
@click.pass_context
def undrain(ctx: click.Context, site: str) -> None:
    """Let applications run on SITE again."""
    _run(ctx, "undrain", {"site": _name(site, SITE_PATTERN, "SITE")})


@cmd.command()
@click.argument("app")
@click.option("--reason", default=None, help="Why (stored with the mark).")
@click.pass_context
def fence(ctx: click.Context, app: str, reason: str | None) -> None:
    """Stop APP everywhere and hold it stopped."""
    _run(ctx, "fence", {"app": _name(app, NAME_PATTERN, "APP"), "reason": reason})


@cmd.command()
@click.argument("app")
@click.pass_context
def resume(ctx: click.Context, app: str) -> None:
    """Lift a fence: APP may run again."""
    _run(ctx, "resume", {"app": _name(app, NAME_PATTERN, "APP")})


@cmd.command()
@click.pass_context
def ping(ctx: click.Context) -> None:
    """Check that some agent's command plane answers."""
    _run(ctx, "ping", {})
