"""``harmony-agent agent forget SITE/NODE``: remove a departed agent's records.

An agent that is gone for good (a decommissioned machine) leaves ``agent.<site>.<node>``
and its instance reports ``inst.*.<site>.<node>`` in ``harmony-state``: ``status`` shows it
``HEALTHY no`` for ever. ``forget`` deletes them, but only once the agent is certainly not
alive, because deleting a live agent's record would break its session:

* its record in ``harmony-state`` says ``alive`` and was written within 2 x its ttl, or
* its session ``sess.<site>.<node>.live`` in the lease stores (v2: the stores named by the
  ``mesh`` descriptor) is live in a majority of them (renewed within 2 x ttl, not expired
  or closed), or too few stores answer to tell, or
* it answers a ``ping`` on its command subject

and it refuses. The record itself is deleted by compare-and-set on the revision that was
checked, so an agent writing at that very moment is not forgotten either.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.cli.completion_names import complete_agents
from agent.cli.options import mesh_options, settings
from agent.patterns import NODE_PATTERN, SITE_PATTERN

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from agent.cli.profile import Profile
    from agent.commands.client import MeshClient

STALE_FACTOR = 2.0
DEFAULT_TTL = 10.0
PING_TIMEOUT = 2.0


def _json(raw: bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(raw or b"")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _ttl(data: dict[str, Any]) -> float:
    try:
        return float(data.get("ttl", DEFAULT_TTL))
    except (TypeError, ValueError):
        return DEFAULT_TTL


def _age(entry: KeyValue.Entry, now: datetime) -> float | None:
    written: Any = entry.created
    return (now - written).total_seconds() if isinstance(written, datetime) else None


def _recent(entry: KeyValue.Entry, now: datetime) -> bool:
    data = _json(entry.value)
    age = _age(entry, now)
    return age is None or age <= STALE_FACTOR * _ttl(data)


async def _latest(kv: KeyValue, pattern: str) -> list[KeyValue.Entry]:
    """Current entries matching ``pattern`` with their write times (a watch has them)."""
    from agent.commands.marks import live_entries

    return await live_entries(kv, pattern)


async def _stores(mesh: MeshClient, state: KeyValue) -> list[str]:
    """Lease stores named by the v2 ``mesh`` descriptor; [] on a mesh without one."""
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await state.get("mesh")
    except KeyNotFoundError:
        return []
    stores = _json(entry.value).get("stores")
    return [s for s in stores if isinstance(s, str)] if isinstance(stores, list) else []


async def _session_live(mesh: MeshClient, stores: list[str], site: str, node: str) -> str | None:
    """Why the agent's v2 session may be live (None: it is not)."""
    import asyncio

    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError

    from agent.commands.client import MeshError

    now = datetime.now(UTC)
    live = answered = 0
    for store in stores:
        try:
            kv = await mesh.bucket(f"harmony-leases-{store}")
            entries = await asyncio.wait_for(_latest(kv, f"sess.{site}.{node}.>"), mesh.timeout)
        except (MeshError, NatsError, JsError, TimeoutError):
            continue
        answered += 1
        record = next((e for e in entries if e.key == f"sess.{site}.{node}.live"), None)
        if record is None:
            continue
        expired = any(
            e.key.startswith(f"sess.{site}.{node}.expired.")
            and (e.revision or 0) > (record.revision or 0)
            for e in entries
        )
        state = _json(record.value).get("state", "alive")
        if not expired and state not in ("closed", "expired") and _recent(record, now):
            live += 1
    quorum = len(stores) // 2 + 1
    if answered < quorum:
        return f"only {answered} of {len(stores)} lease stores answered: cannot tell"
    if live >= quorum:
        return f"its session is live in {live} of {len(stores)} lease stores"
    return None


async def _answers_ping(mesh: MeshClient, site: str, node: str) -> bool:
    from agent.commands.client import MeshError
    from mesh.names import agent_cmd_subject

    try:
        await mesh.request(
            agent_cmd_subject(site, node, "ping"), {}, min(PING_TIMEOUT, mesh.timeout)
        )
    except MeshError:
        return False
    return True


async def forget_agent(profile: Profile, timeout: float, site: str, node: str) -> str:
    """Delete the agent's records if it is not alive; the sentence to print."""
    from nats.errors import Error as NatsError
    from nats.js.errors import Error as JsError
    from nats.js.errors import KeyWrongLastSequenceError

    from agent.commands.client import MeshError, open_mesh
    from mesh.names import STATE_BUCKET

    agent_id = f"{site}/{node}"
    async with open_mesh(profile, timeout) as mesh:
        state = await mesh.bucket(STATE_BUCKET)
        try:
            records = await _latest(state, f"agent.{site}.{node}")
            reports = await _latest(state, f"inst.*.{site}.{node}")
            stores = await _stores(mesh, state)
        except (NatsError, JsError, TimeoutError) as exc:
            raise MeshError(f"read failed: {mesh.explain(exc)}") from None
        if not records and not reports:
            raise MeshError(f"the mesh has no record of agent {agent_id}")
        now = datetime.now(UTC)
        record = records[0] if records else None
        if record is not None:
            data = _json(record.value)
            if data.get("state", "alive") == "alive" and _recent(record, now):
                age = _age(record, now)
                seen = f" {age:.1f}s ago" if age is not None else ""
                raise MeshError(
                    f"{agent_id} is alive (its record was written{seen}); stop it first"
                )
        why = await _session_live(mesh, stores, site, node) if stores else None
        if why is not None:
            raise MeshError(f"{agent_id} may be alive ({why}); stop it first")
        if await _answers_ping(mesh, site, node):
            raise MeshError(f"{agent_id} is alive (it answers ping); stop it first")
        try:
            if record is not None:
                await state.delete(record.key, last=record.revision)
            for report in reports:
                await state.delete(report.key)
        except KeyWrongLastSequenceError:
            raise MeshError(f"{agent_id} wrote its record just now: it is alive") from None
        except (NatsError, JsError, TimeoutError) as exc:
            raise MeshError(f"delete failed: {mesh.explain(exc)}") from None
    what = [f"agent.{site}.{node}"] if record is not None else []
    if reports:
        what.append(f"{len(reports)} instance report{'s' if len(reports) != 1 else ''}")
    return f"agent {agent_id} forgotten (deleted {' and '.join(what)})"


@click.group("agent")
def agent() -> None:
    """Manage agent records (forget a departed agent)."""


@agent.command("forget")
@click.argument("agent_id", metavar="SITE/NODE", shell_complete=complete_agents)
@mesh_options(timeout="5s")
@click.pass_context
def forget(ctx: click.Context, agent_id: str) -> None:
    """Delete the records of an agent that is gone for good (refused while it lives)."""
    import asyncio
    import re

    from agent.commands.client import MeshError

    site, _, node = agent_id.partition("/")
    if not re.match(SITE_PATTERN, site) or not re.match(NODE_PATTERN, node):
        fail(f"SITE/NODE: {agent_id!r} is not an agent id like site-a/node-1", EXIT_BAD_INPUT)
    opts = settings(ctx)
    try:
        click.echo(asyncio.run(forget_agent(opts.profile, opts.timeout, site, node)))
    except MeshError as exc:
        fail(str(exc))
