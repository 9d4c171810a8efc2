"""Pure lease decisions: given what we observed and the monotonic time, what to do next.

No I/O here. ``mesh.leases.LeaseManager`` feeds ``decide`` with its watch cache and executes
the ``Decision`` (each acquisition or expiry is a compare-and-set it performs); this split
lets the rules below be unit-tested with a fake clock, and every decision carries a human
sentence that is logged and shown in status (as Patroni does).

The rules (docs/leases.md has the safety argument):

* A lease value names the holder's *session* (key, epoch, and the session key's revision
  when the lease was taken). The lease is valid exactly as long as that session epoch.
* A lease is **free** when its key is absent or deleted; or its session key now shows a
  different epoch *at a later revision* than the one recorded, or the same epoch marked
  ``closed``/``expired``; or it carries a handover marker for us (immediately) or for
  someone else who did not take it within ``handover_window`` of our watching it.
* A session whose epoch is alive is ended only by ``expire``: after *we* watched its key
  stay at one revision for its full ttl on *our* monotonic clock (never a wall-clock
  comparison between machines).
* When free, a contender of preference rank ``r`` acquires ``r * step`` after it saw the
  lease become free, so the most preferred live site wins without a vote; a healthy holder
  is never pre-empted (only an explicit release or handover moves it).
* Observations older than the lease (session revision below the recorded one) are stale
  reads: we wait for the watch to catch up rather than act on them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from mesh.session import SessionView

HELD = "held"
HANDOVER = "handover"


@dataclass(frozen=True)
class LeaseValue:
    """The JSON stored under a lease key. Written only on acquisition and release."""

    holder: str
    """``<site>/<node>`` of the holding agent."""
    session: str
    """The holder's session key (``agent.<site>.<node>`` in ``harmony-state``)."""
    epoch: str
    session_rev: int
    """Revision of the session key when the lease was taken: guards against stale reads."""
    ttl: float
    acquired_at: str
    """Wall-clock time, for display only: no decision reads it."""
    state: str = HELD
    handover_to: str | None = None
    """With ``state == "handover"``: the agent id or site allowed to take it at once."""

    def encode(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes | None) -> LeaseValue | None:
        """None for anything that is not a lease value (never raises)."""
        if not raw:
            return None
        try:
            data: dict[str, Any] = json.loads(raw)
            return cls(
                holder=str(data["holder"]),
                session=str(data["session"]),
                epoch=str(data["epoch"]),
                session_rev=int(data["session_rev"]),
                ttl=float(data["ttl"]),
                acquired_at=str(data.get("acquired_at", "")),
                state=str(data.get("state", HELD)),
                handover_to=(str(data["handover_to"]) if data.get("handover_to") else None),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class LeaseObs:
    """What our watch last showed for one lease key."""

    revision: int | None
    """Revision of the last entry (a delete marker has one too); None: never seen."""
    value: LeaseValue | None
    """None when absent, deleted or unreadable (see ``readable``)."""
    since: float
    """Our monotonic time when we first saw this revision (or the key's absence)."""
    readable: bool = True


@dataclass(frozen=True)
class SessionObs:
    """What our watch last showed for the holder's session key."""

    revision: int
    view: SessionView | None
    """None when the key was deleted or holds something unreadable."""
    since: float
    """Our monotonic time when we first saw this revision."""


@dataclass(frozen=True)
class Me:
    """The deciding agent and its own session, as it knows them now."""

    agent: str
    site: str
    session_key: str
    epoch: str
    valid: bool
    """Our session is valid now (``Session.valid()``): we may hold leases."""
    ttl: float


class Action(StrEnum):
    HOLD = "hold"
    """We hold it (``token``); if we did not know it yet, adopt it (our write landed)."""
    ACQUIRE = "acquire"
    """Write our value by CAS on revision ``last`` (None: create)."""
    EXPIRE = "expire"
    """End the holder's session by CAS on ``session``'s revision, then decide again."""
    WAIT = "wait"
    """Nothing to do; decide again at ``retry_at`` or on the next change."""
    LOST = "lost"
    """We held it and must stop believing so now."""


@dataclass(frozen=True)
class Decision:
    action: Action
    why: str
    """One sentence for logs, status and tests."""
    token: int | None = None
    last: int | None = None
    session: SessionView | None = None
    retry_at: float | None = None


def _wait(why: str, retry_at: float | None = None) -> Decision:
    return Decision(Action.WAIT, why, retry_at=retry_at)


def _free_since(
    lease: LeaseObs, value: LeaseValue, holder: SessionObs | None, me: Me, window: float
) -> tuple[float, str] | Decision | None:
    """When the lease became free, with the reason; a Decision if we must wait; None if the
    holder's session epoch is alive (the caller applies the takeover timing)."""
    if value.state == HANDOVER:
        if value.handover_to in (me.agent, me.site):
            return float("-inf"), f"handed over to us by {value.holder}"
        return lease.since + window, f"handed over to {value.handover_to}, who did not take it"
    if holder is None:
        return _wait(f"held by {value.holder}; its session {value.session} not seen yet")
    if holder.revision < value.session_rev:
        return _wait(
            f"held by {value.holder}; our view of {value.session} (rev {holder.revision}) "
            f"is older than the lease (rev {value.session_rev}): waiting for the watch"
        )
    view = holder.view
    if view is None:
        return holder.since, f"session {value.session} of {value.holder} was deleted"
    if view.epoch == value.epoch:
        if not view.alive:
            return holder.since, f"session of {value.holder} is {view.state}"
        return None
    if holder.revision > value.session_rev:
        return holder.since, f"{value.holder} started a new session epoch since taking it"
    return _wait(f"inconsistent view of {value.session}: waiting for the watch")


def decide(
    *,
    lease: LeaseObs,
    holder: SessionObs | None,
    me: Me,
    now: float,
    held_token: int | None,
    rank: int = 0,
    step: float = 0.1,
    handover_window: float | None = None,
    dropped: int = 0,
) -> Decision:
    """One decision for one wanted lease. Pure: same inputs, same answer.

    ``held_token`` is the token we believe we hold (None if we do not). ``holder`` is the
    observation of the session key named by the lease value (None if not observed).
    ``dropped`` is the highest token of this key we already stopped holding: a value of ours
    at or below it is our own release still in flight, never to be adopted again.
    """
    value = lease.value
    ours = (
        value is not None
        and value.state == HELD
        and value.session == me.session_key
        and value.epoch == me.epoch
    )
    if held_token is not None:
        if not me.valid:
            return Decision(Action.LOST, "our session is no longer valid", token=held_token)
        rev = lease.revision
        if rev is not None and rev > held_token and not ours:
            by = value.holder if value is not None else "a delete"
            return Decision(Action.LOST, f"lease rewritten at rev {rev} by {by}", token=held_token)
        return Decision(Action.HOLD, f"we hold it (token {held_token})", token=held_token)

    if not me.valid:
        return _wait("our session is not valid: we cannot hold leases now")
    if ours and (lease.revision or 0) <= dropped:
        return _wait(f"our release of rev {lease.revision} is in flight")
    if ours:
        assert lease.revision is not None
        return Decision(
            Action.HOLD,
            f"our acquisition landed at rev {lease.revision} without an answer: adopting it",
            token=lease.revision,
        )
    if value is None and not lease.readable:
        return _wait(f"unreadable value at rev {lease.revision}: not touching it")

    window = me.ttl if handover_window is None else handover_window
    if value is None:
        since, reason = lease.since, "the key is free"
    else:
        free = _free_since(lease, value, holder, me, window)
        if isinstance(free, Decision):
            return free
        if free is None:
            assert holder is not None and holder.view is not None
            view = holder.view
            ttl = max(view.ttl, me.ttl)
            due = holder.since + ttl
            if now >= due:
                return Decision(
                    Action.EXPIRE,
                    f"session of {value.holder} unchanged at rev {holder.revision} for "
                    f"{now - holder.since:.2f}s >= ttl {ttl:g}s: expiring it",
                    session=view,
                )
            return _wait(
                f"held by {value.holder} (token {lease.revision}); its session is alive, "
                f"renewed {now - holder.since:.2f}s ago by our watch",
                retry_at=due,
            )
        since, reason = free

    at = since + rank * step
    if now >= at:
        return Decision(Action.ACQUIRE, f"acquiring: {reason} (rank {rank})", last=lease.revision)
    return _wait(f"{reason}; deferring {at - now:.2f}s to better-ranked sites", retry_at=at)
