"""``harmony-agent events``: the mesh's audit trail, the ``harmony-events`` stream.

Agents publish their transitions on ``harmony.events.<site>.<node>.<event>`` (lease won or
lost, workload started or stopped, handovers); operators' commands appear on
``harmony.audit.<user>.<verb>`` where the stream captures them. One line per event, oldest
first; ``-o json`` prints one JSON object per line. Read through an ordered consumer that
lives as long as the command: nothing is acknowledged or left behind in the stream.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import EXIT_BAD_INPUT, fail, parse_timeout
from agent.cli.completion_names import complete_apps
from agent.cli.options import mesh_options, output_option, settings

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from agent.cli.profile import Profile
    from agent.commands.client import MeshClient

POLL = 1.0


def event_record(msg: Msg) -> dict[str, Any]:
    """The JSON form of one event: the publisher's fields plus where it was stored."""
    try:
        body = json.loads(msg.data)
    except ValueError:
        body = None
    record: dict[str, Any] = (
        body if isinstance(body, dict) else {"raw": msg.data.decode(errors="replace")}
    )
    meta = msg.metadata
    record.setdefault(
        "time", meta.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    parts = msg.subject.split(".")
    if parts[:2] == ["harmony", "audit"] and len(parts) >= 4:
        # The server let only <user> publish here: the subject is who did it, the body
        # merely what the client said (kept as claimed_user when it differs).
        claimed = record.get("user")
        record["user"] = parts[2]
        if claimed is not None and claimed != parts[2]:
            record["claimed_user"] = claimed
    return {"subject": msg.subject, "seq": meta.sequence.stream, **record}


def event_line(record: dict[str, Any]) -> str:
    """``TIME WHO EVENT APP [token N] sentence``, one line whatever the event carries."""
    parts = record["subject"].split(".")
    audit = parts[:2] == ["harmony", "audit"] and len(parts) >= 4
    if audit:
        who, event = f"audit:{parts[2]}", parts[3]
    else:
        who = str(record.get("agent") or "/".join(parts[2:4]))
        event = str(record.get("event") or parts[-1])
    app = record.get("app") or "-"
    token = record.get("fencing_token")
    sentence = record.get("sentence") or record.get("message") or record.get("detail") or ""
    if not sentence:
        shown = {"subject", "seq", "time", "app", "fencing_token"}
        shown |= {"user", "request_id"} if audit else {"agent", "site", "node", "event"}
        sentence = " ".join(f"{k}={v}" for k, v in record.items() if k not in shown)
    text = f"{record['time']}  {who}  {event}  {app}"
    if token is not None:
        text += f"  token {token}"
    if sentence:
        text += f"  {' '.join(str(sentence).split())}"
    return text


async def _subscribe(mesh: MeshClient, since: float | None) -> Any:
    import asyncio
    from datetime import UTC, datetime, timedelta

    from nats.js.api import ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    from agent.commands.client import MeshError
    from mesh.names import EVENTS_STREAM

    try:
        info = await asyncio.wait_for(mesh.js.stream_info(EVENTS_STREAM), mesh.timeout)
    except NotFoundError:
        raise MeshError(
            f"mesh not initialised: stream {EVENTS_STREAM!r} does not exist "
            "(no agent has started against this NATS yet)"
        ) from None
    subjects = list(info.config.subjects or ["harmony.events.>"])
    config = ConsumerConfig()
    policy = DeliverPolicy.ALL
    if since is not None:
        policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime.now(UTC) - timedelta(seconds=since)
    if len(subjects) > 1:
        config.filter_subjects = subjects
    return await asyncio.wait_for(
        mesh.js.subscribe(
            subjects[0],
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=policy,
            config=config,
        ),
        mesh.timeout,
    )


async def follow_events(
    profile: Profile,
    timeout: float,
    *,
    app: str | None,
    since: float | None,
    follow: bool,
    output: str,
) -> None:
    import asyncio

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.client import MeshError, open_mesh

    async with open_mesh(profile, timeout) as mesh:
        try:
            sub = await _subscribe(mesh, since)
            info = await asyncio.wait_for(sub.consumer_info(), timeout)
            # A push consumer may have delivered everything before this answer (pending
            # 0): then each message's own num_pending says when the history ends.
            more = (info.num_pending or 0) > 0 or (info.delivered.consumer_seq or 0) > 0
        except (NatsError, JsError, TimeoutError) as exc:
            raise MeshError(f"cannot read the events: {mesh.explain(exc)}") from None
        try:
            while follow or more:
                try:
                    msg = await sub.next_msg(timeout=POLL)
                except TimeoutError:
                    if not mesh.nc.is_connected:
                        raise MeshError("lost the connection to the mesh") from None
                    continue
                more = (msg.metadata.num_pending or 0) > 0
                record = event_record(msg)
                if app is not None and record.get("app") != app:
                    continue
                text = json.dumps(record, separators=(",", ":")) if output == "json" else None
                click.echo(text or event_line(record))
        finally:
            with contextlib.suppress(NatsError, TimeoutError):
                await sub.unsubscribe()


@click.command()
@click.option(
    "--app",
    default=None,
    metavar="APP",
    shell_complete=complete_apps,
    help="Only this application's events.",
)
@click.option(
    "--since",
    default=None,
    metavar="DURATION",
    help="Only events of the last DURATION (e.g. 10m, 2h).",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as they arrive.")
@output_option(["text", "json"], "text", "text (one line per event) or json (one object per line).")
@mesh_options(timeout="5s")
@click.pass_context
def events(ctx: click.Context, app: str | None, since: str | None, follow: bool) -> None:
    """Print the mesh's event stream (harmony-events)."""
    import asyncio
    import re

    from agent.commands.client import MeshError
    from agent.patterns import NAME_PATTERN

    if app is not None and not re.match(NAME_PATTERN, app):
        fail(f"--app: {app!r} is not a valid application name", EXIT_BAD_INPUT)
    seconds = parse_timeout(since, "--since") if since is not None else None
    opts = settings(ctx)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                follow_events(
                    opts.profile,
                    opts.timeout,
                    app=app,
                    since=seconds,
                    follow=follow,
                    output=opts.output,
                )
            )
    except MeshError as exc:
        fail(str(exc))
