"""Operator marks stored in the mesh: ``drain.<site>`` and ``fence.<app>`` in ``harmony-state``.

Why KV keys and not agent memory: a drain or a fence is a decision by a human that must
outlive any agent (restarts, crashes, a whole site going away and coming back), and every
agent must see the same answer. The controller reads these keys every cycle.

Who writes them (SPEC v2): the operator, with their own credentials: ``harmony-agent cmd
drain`` writes the mark itself and publishes ``harmony.audit.<user>.drain``
(``agent.commands.audit``); under per-identity accounts an agent may not write marks at all.
``apply_mark`` is that one write, shared with the agents' legacy ``drain``/``fence`` verbs,
which still serve meshes with one shared account.

Value (JSON): ``{"kind": "drain", "site": "site-b", "by": "ops-1", "at": RFC3339,
"reason": "...", "request_id": "..."}`` or ``{"kind": "fence", "app": "ledger", ...}``. The
*presence* of a live key is the mark; undrain/resume delete it. ``by`` is what the writer
said; the identity the server vouched for is the audit event's subject with the same
``request_id``. Readers must treat a value they cannot parse as present (a mark written by
a newer version is still a mark): ``parse_mark`` never fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from agent.commands.reply import Reply

DRAIN_PREFIX = "drain."
FENCE_PREFIX = "fence."


def now_rfc3339() -> str:
    """Like ``mesh.session.now_rfc3339``, without importing the session machinery (and
    structlog) into the CLI, which reads marks."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def drain_key(site: str) -> str:
    """``harmony-state`` key whose presence keeps every application off ``site``."""
    return f"{DRAIN_PREFIX}{site}"


def fence_key(app: str) -> str:
    """``harmony-state`` key whose presence holds ``app`` stopped everywhere."""
    return f"{FENCE_PREFIX}{app}"


@dataclass(frozen=True)
class Mark:
    """One drain or fence mark as read back from the mesh."""

    kind: str
    target: str
    by: str | None
    at: str | None
    reason: str | None
    revision: int

    def as_dict(self) -> dict[str, Any]:
        return {"by": self.by, "at": self.at, "reason": self.reason, "revision": self.revision}


def parse_mark(key: str, value: bytes | None, revision: int) -> Mark | None:
    """The mark under ``key``, or None if the key is not a mark key. Never raises."""
    if key.startswith(DRAIN_PREFIX):
        kind, target = "drain", key[len(DRAIN_PREFIX) :]
    elif key.startswith(FENCE_PREFIX):
        kind, target = "fence", key[len(FENCE_PREFIX) :]
    else:
        return None
    data: dict[str, Any] = {}
    try:
        loaded = json.loads(value or b"{}")
        if isinstance(loaded, dict):
            data = loaded
    except (ValueError, RecursionError):
        pass

    def text(name: str) -> str | None:
        v = data.get(name)
        return v if isinstance(v, str) else None

    return Mark(kind, target, text("by"), text("at"), text("reason"), revision)


def _value(
    kind: str,
    field: str,
    target: str,
    by: str | None,
    reason: str | None,
    request_id: str | None = None,
) -> bytes:
    body = {"kind": kind, field: target, "by": by, "at": now_rfc3339(), "reason": reason}
    if request_id is not None:
        body["request_id"] = request_id
    return json.dumps(body, separators=(",", ":")).encode()


async def _read(kv: KeyValue, key: str) -> Mark | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return parse_mark(key, entry.value, entry.revision or 0)


async def _set(kv: KeyValue, key: str, value: bytes) -> tuple[Mark, bool]:
    """Create the mark if absent. Returns (mark, changed); an existing mark is kept as is,
    so a repeated drain does not rewrite who drained the site and when."""
    for _ in range(3):
        existing = await _read(kv, key)
        if existing is not None:
            return existing, False
        try:
            revision = await kv.create(key, value)
        except KeyWrongLastSequenceError:
            continue  # someone marked it at the same moment: read theirs
        mark = parse_mark(key, value, revision)
        assert mark is not None
        return mark, True
    existing = await _read(kv, key)
    if existing is None:
        raise RuntimeError(f"could not write {key}: concurrent writers")
    return existing, False


async def _clear(kv: KeyValue, key: str) -> Mark | None:
    """Delete the mark; returns the mark that was removed, None if there was none."""
    existing = await _read(kv, key)
    if existing is not None:
        await kv.delete(key)
    return existing


async def set_drain(
    kv: KeyValue,
    site: str,
    *,
    by: str | None = None,
    reason: str | None = None,
    request_id: str | None = None,
) -> tuple[Mark, bool]:
    return await _set(kv, drain_key(site), _value("drain", "site", site, by, reason, request_id))


async def clear_drain(kv: KeyValue, site: str) -> Mark | None:
    return await _clear(kv, drain_key(site))


async def set_fence(
    kv: KeyValue,
    app: str,
    *,
    by: str | None = None,
    reason: str | None = None,
    request_id: str | None = None,
) -> tuple[Mark, bool]:
    return await _set(kv, fence_key(app), _value("fence", "app", app, by, reason, request_id))


async def clear_fence(kv: KeyValue, app: str) -> Mark | None:
    return await _clear(kv, fence_key(app))


async def live_entries(kv: KeyValue, pattern: str) -> list[KeyValue.Entry]:
    """The current (non-deleted) entries whose key matches ``pattern``, read once through
    an ordered consumer: one round of messages instead of a get per key."""
    watcher = await kv.watch(pattern, ignore_deletes=True)
    out: list[KeyValue.Entry] = []
    try:
        async for entry in watcher:
            if entry is None:
                break
            out.append(entry)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return out


async def read_marks(kv: KeyValue) -> tuple[dict[str, Mark], dict[str, Mark]]:
    """All current marks: (drained sites, fenced apps), for a controller's one-shot read.

    A controller that already watches ``harmony-state`` can call ``parse_mark`` on each
    entry instead.
    """
    drains: dict[str, Mark] = {}
    fences: dict[str, Mark] = {}
    for prefix, into in ((DRAIN_PREFIX, drains), (FENCE_PREFIX, fences)):
        for entry in await live_entries(kv, prefix + "*"):
            mark = parse_mark(entry.key, entry.value, entry.revision or 0)
            if mark is not None:
                into[mark.target] = mark
    return drains, fences


# --- the four verbs, as one write each ------------------------------------------------------

MARK_VERBS = frozenset({"drain", "undrain", "fence", "resume"})


async def app_exists(kv: KeyValue, app: str) -> bool:
    from mesh.names import app_key

    try:
        await kv.get(app_key(app))
    except KeyNotFoundError:
        return False
    return True


async def _placements(kv: KeyValue) -> dict[str, tuple[str, ...]]:
    """Each stored Application's placement sites (decoded without pydantic: the CLI runs
    this, and ``apply`` validated every value when it was written)."""
    from agent.meshview import AppView

    out: dict[str, tuple[str, ...]] = {}
    for entry in await live_entries(kv, "app.*"):
        name = entry.key.split(".", 1)[1]
        view = AppView.decode(name, entry.value or b"")
        if view is not None:
            out[name] = view.sites
    return out


async def known_sites(kv: KeyValue) -> set[str]:
    """Sites with an agent heartbeat or in some application's placement: a drain of
    anything else is almost certainly a typo, and would silently do nothing."""
    sites = {e.key.split(".")[1] for e in await live_entries(kv, "agent.*.*")}
    for placement in (await _placements(kv)).values():
        sites.update(placement)
    return sites


async def drain_effect(kv: KeyValue, site: str) -> tuple[list[str], list[str]]:
    """(applications that move to another site, applications that stop) when ``site``
    is drained: an application moves only if its placement names another site that is
    not drained itself."""
    drained = {e.key.split(".", 1)[1] for e in await live_entries(kv, "drain.*")}
    moves: list[str] = []
    stops: list[str] = []
    for name, sites in sorted((await _placements(kv)).items()):
        if site not in sites:
            continue
        elsewhere = [s for s in sites if s != site and s not in drained]
        (moves if elsewhere else stops).append(name)
    return moves, stops


async def apply_mark(
    kv: KeyValue,
    verb: str,
    target: str,
    *,
    by: str | None = None,
    reason: str | None = None,
    request_id: str | None = None,
) -> Reply:
    """drain/undrain SITE or fence/resume APP: the reply says what changed (or why not).
    Repeating a verb changes nothing (a drained site stays drained by its first writer)."""
    match verb:
        case "drain":
            known = await known_sites(kv)
            if target not in known:
                listed = ", ".join(sorted(known)) or "none"
                return Reply.failure(f"unknown site {target!r} (known: {listed})")
            mark, changed = await set_drain(kv, target, by=by, reason=reason, request_id=request_id)
            moves, stops = await drain_effect(kv, target)
            return Reply.success(
                verb="drain",
                site=target,
                changed=changed,
                moves=moves,
                stops=stops,
                **mark.as_dict(),
            )
        case "undrain":
            removed = await clear_drain(kv, target)
            return Reply.success(verb="undrain", site=target, changed=removed is not None)
        case "fence":
            if not await app_exists(kv, target):
                return Reply.failure(f"unknown application {target!r}")
            mark, changed = await set_fence(kv, target, by=by, reason=reason, request_id=request_id)
            return Reply.success(verb="fence", app=target, changed=changed, **mark.as_dict())
        case "resume":
            removed = await clear_fence(kv, target)
            if removed is None and not await app_exists(kv, target):
                return Reply.failure(f"unknown application {target!r}")
            return Reply.success(verb="resume", app=target, changed=removed is not None)
    return Reply.failure(f"{verb!r} is not a mark verb")
