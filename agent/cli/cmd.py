"""``harmony-agent cmd``: operator verbs (docs/commands.md).

drain/undrain/fence/resume are marks in ``harmony-state`` that the CLI writes itself, with
the operator's own credentials (SPEC v2: agents may not write marks); failover goes to
``harmony.cmd.app.<name>.failover``, which only the holder answers, once the CLI has checked
that the application exists; ping goes to a healthy agent. Every verb but ping then
publishes ``harmony.audit.<user>.<verb>`` with the target and the outcome
(``agent.commands.audit``). Requests to agents carry a request id, so the one retry the CLI
makes after a lost reply is answered, not acted on twice. Names are validated locally
(exit 2) so that a typo never reaches the mesh.
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
    from agent.commands.audit import Auditor
    from agent.commands.client import MeshClient
    from agent.commands.reply import Reply

OUTPUTS = ["text", "json"]
MARK_VERBS = ("drain", "undrain", "fence", "resume")


async def live_agents(mesh: MeshClient) -> list[str]:
    """Whom to ask, most recently heard from first: agents whose record in
    ``harmony-state`` says alive and healthy and was written within 2 x their ttl plus the
    record's refresh period (it is rewritten on change and every ``SUMMARY_REFRESH_S``;
    the agent's liveness proper is its session in the lease stores, which ``status`` reads).
    A dead agent that still looks alive here answers nothing: its request fails at once
    (no responders) and the next agent is asked.

    This is ``status``'s health rule applied to routing only (a wrong guess costs one
    refused request and the next agent is asked); it reads the records directly so that
    ``cmd`` does not load the Application models ``agent.meshview`` decodes.
    """
    import json
    from datetime import UTC, datetime

    from agent.commands.marks import live_entries
    from mesh.names import STATE_BUCKET, SUMMARY_REFRESH_S

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
        if alive and age <= 2 * ttl + SUMMARY_REFRESH_S:
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
    subject = app_cmd_subject(app, "failover")
    try:
        try:
            return await mesh.request(subject, body, timeout / 2)
        except MeshError as exc:
            if "no reply" not in str(exc):
                raise
            # The reply may be what was lost: the same request id is answered, not redone.
            return await mesh.request(subject, body, timeout / 2)
    except MeshError as exc:
        if "no agent serves" not in str(exc):
            raise
        raise MeshError(
            f"{app}: no agent holds it now, so there is no running instance to move "
            "(see `harmony-agent status`)"
        ) from None


async def _mark(mesh: MeshClient, verb: str, body: dict[str, Any], timeout: float) -> Reply:
    """Write the mark ourselves (our credentials, our identity in the mark)."""
    import asyncio

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.client import MeshError
    from agent.commands.marks import apply_mark
    from mesh.names import STATE_BUCKET

    kv = await mesh.bucket(STATE_BUCKET)
    target = body.get("site") or body["app"]
    write = apply_mark(
        kv,
        verb,
        target,
        by=body.get("by"),
        reason=body.get("reason"),
        request_id=body.get("request_id"),
    )
    try:
        return await asyncio.wait_for(write, timeout)
    except (NatsError, JsError, TimeoutError) as exc:
        raise MeshError(f"{verb} {target}: write refused: {mesh.explain(exc)}") from None


async def _send(
    profile: Profile,
    timeout: float,
    verb: str,
    body: dict[str, Any],
    via: str | None,
    auditor: Auditor | None = None,
) -> Reply:
    from agent.commands.client import MeshError, open_mesh
    from mesh.names import agent_cmd_subject

    async with open_mesh(profile, timeout) as mesh:
        if verb == "failover":
            reply = await _failover(mesh, body, timeout)
        elif verb in MARK_VERBS:
            reply = await _mark(mesh, verb, body, timeout)
        else:
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
        if auditor is not None:
            await _audit(mesh, auditor, verb, body, reply, timeout)
        return reply


async def _audit(
    mesh: MeshClient, auditor: Auditor, verb: str, body: dict[str, Any], reply: Reply, t: float
) -> None:
    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.audit import outcome
    from agent.commands.client import MeshError

    fields = {k: v for k, v in body.items() if k not in ("by",) and v is not None}
    said = reply.fields
    keys: tuple[str, ...] = ("changed", "moves", "stops", "agent")
    detail = {k: said[k] for k in keys if k in said}
    try:
        await auditor.publish(
            mesh.js, verb, {**fields, **outcome(reply.ok, reply.error), **detail}, t
        )
    except (NatsError, JsError, TimeoutError) as exc:
        done = "done" if reply.ok else "refused"
        raise MeshError(
            f"{verb} {done}, but its audit event was not recorded: {mesh.explain(exc)}"
        ) from None


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

    from agent.commands.audit import Auditor, new_request_id
    from agent.commands.client import MeshError

    opts = settings(ctx)
    via = _via(ctx)
    auditor = None
    if verb != "ping":
        auditor = Auditor.of(opts.profile.cert_file, opts.profile.user)
        body = {**body, "by": auditor.user, "request_id": new_request_id()}
    try:
        reply = asyncio.run(_send(opts.profile, opts.timeout, verb, body, via, auditor))
    except MeshError as exc:
        fail(str(exc))
    if opts.output == "json":
        click.echo(json.dumps(json.loads(reply.encode()), indent=2))
    if not reply.ok:
        fail(f"{verb} refused by {reply.fields.get('agent') or 'the mesh'}: {reply.error}")
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
