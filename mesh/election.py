"""Pure lease decisions over a quorum of stores: what we observed in, what to do out.

No I/O here: ``mesh.leases.LeaseManager`` feeds ``decide`` from its watch cache and carries
the ``Decision`` out with compare-and-set writes, so every rule is unit-tested with a fake
clock, and every decision carries one sentence for logs and status (as Patroni does).

Per store, a lease family is classified (``classify``) as:

* ``MINE``: our claim with our *current* epoch in that store is the newest claim;
* ``FREE`` since some instant: no claim; or the newest claim is released; handed over to us
  (at once) or to someone who did not take it within ``window``; or its holder's session
  in *that store* was expired, closed, or moved to another epoch; or it is our own claim of
  an earlier holding;
* ``HELD`` by another agent whose session epoch in that store is alive: the session's
  family sequence and since when *we* have seen it unchanged;
* ``UNKNOWN``: the store is not ready (unreachable, watch not current, quarantined).

Then for the lease (``decide``):

* holding: we keep it while our claims stand in a quorum of stores; stores where it is free
  again (our epoch there changed) are repaired; fewer than a quorum means lost;
* not holding: a quorum of ``FREE`` (or ``MINE``) stores lets us acquire, ``rank * step``
  after a quorum became free, with term = 1 + the highest term seen (at least ``floor``);
  otherwise a holder seen unchanged for a full ttl in enough stores to reach a quorum is
  expired there (its session, by CAS over the sequence we watched); else we wait.

No decision compares the wall clocks of two machines; the only times are ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from mesh.records import ClaimRecord, ClaimState
from mesh.stores import quorum

NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class SessionObs:
    """One agent's session family in one store, as our watch last showed it."""

    seq: int
    """Last sequence of the family (its live record or an expiry of it)."""
    since: float
    """Our clock when we first saw ``seq``."""
    epoch: str | None
    """Epoch of the live record; None when there is none or it is unreadable."""
    alive: bool
    ttl: float
    expired_epoch: str | None = None
    """An expiry newer than the live record names this epoch."""


@dataclass(frozen=True, slots=True)
class ClaimObs:
    agent: str
    """The claimant, from the key (server-vouched), not from the value."""
    seq: int
    since: float
    record: ClaimRecord | None
    """None: unreadable value (treated as held by ``agent`` with an unknown epoch)."""


@dataclass(frozen=True, slots=True)
class FamilyObs:
    """One lease family in one store."""

    store: str
    ready: bool
    seq: int
    """Last sequence of the family (0: empty)."""
    since: float
    """Our clock when we first saw the family at ``seq`` (or started watching it)."""
    claims: tuple[ClaimObs, ...] = ()
    sessions: Mapping[str, SessionObs] = field(default_factory=dict)
    """Sessions (in this store) of the agents that have claims here."""
    usable_at: float = NEG_INF
    """Not ready until then (a recreated store's quarantine): decide again at that time."""

    @property
    def latest(self) -> ClaimObs | None:
        return max(self.claims, key=lambda c: c.seq, default=None)

    @property
    def max_term(self) -> int:
        return max((c.record.term for c in self.claims if c.record is not None), default=0)


@dataclass(frozen=True, slots=True)
class Me:
    agent: str
    site: str
    epochs: Mapping[str, str]
    """Our live epoch per store."""
    valid: bool
    ttl: float


class Kind(StrEnum):
    UNKNOWN = "unknown"
    FREE = "free"
    MINE = "mine"
    HELD = "held"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    why: str
    seq: int = 0
    """The family sequence a write must CAS over."""
    since: float = NEG_INF
    """FREE: since when; HELD: since when the holder's session was seen unchanged."""
    holder: str | None = None
    term: int = 0
    session_seq: int = 0
    ttl: float = 0.0


def classify(f: FamilyObs, me: Me, *, window: float, dropped: int = 0) -> Verdict:
    """One store's view of one lease (see the module docstring)."""
    if not f.ready:
        return Verdict(Kind.UNKNOWN, f"store {f.store} not reachable", since=f.usable_at)
    latest = f.latest
    if latest is None:
        return Verdict(Kind.FREE, "no claim", f.seq, f.since)
    rec, holder = latest.record, latest.agent
    if rec is not None and rec.state is ClaimState.HANDOVER:
        # Checked before ownership: our own handover to someone else binds us too.
        if rec.to in (me.agent, me.site):
            return Verdict(Kind.FREE, f"handed over to us by {holder}", f.seq, NEG_INF)
        return Verdict(
            Kind.FREE, f"handed over to {rec.to}, not taken", f.seq, latest.since + window
        )
    if holder == me.agent:
        mine = (
            rec is not None
            and rec.state is ClaimState.HELD
            and rec.epoch == me.epochs.get(f.store)
            and rec.term > dropped
        )
        if mine and rec is not None:
            return Verdict(Kind.MINE, f"our claim, term {rec.term}", f.seq, term=rec.term)
        return Verdict(Kind.FREE, "our own earlier claim", f.seq, latest.since)
    if rec is not None and rec.state is ClaimState.RELEASED:
        return Verdict(Kind.FREE, f"released by {holder}", f.seq, latest.since)
    sess = f.sessions.get(holder)
    if sess is None:
        return Verdict(
            Kind.FREE, f"{holder} has no session in {f.store}", f.seq, latest.since + me.ttl
        )
    epoch = rec.epoch if rec is not None else None
    if epoch is not None and sess.epoch is not None:
        if sess.expired_epoch == epoch:
            return Verdict(Kind.FREE, f"session of {holder} expired", f.seq, sess.since)
        if sess.epoch != epoch:
            if sess.seq < latest.seq:
                return Verdict(Kind.UNKNOWN, f"inconsistent view of {holder}'s session")
            return Verdict(Kind.FREE, f"{holder} opened a new epoch", f.seq, sess.since)
        if not sess.alive:
            return Verdict(Kind.FREE, f"session of {holder} closed", f.seq, sess.since)
    return Verdict(
        Kind.HELD,
        f"held by {holder}",
        f.seq,
        sess.since,
        holder=holder,
        term=rec.term if rec is not None else 0,
        session_seq=sess.seq,
        ttl=max(sess.ttl, me.ttl),
    )


class Action(StrEnum):
    HOLD = "hold"
    """We hold it (``term``, supported by ``support``); write ``writes`` to repair."""
    LOST = "lost"
    ACQUIRE = "acquire"
    """Write our claim with ``term`` in ``writes`` (store -> family sequence to CAS over)."""
    EXPIRE = "expire"
    """Expire ``target``'s session in ``writes`` (store -> session family sequence)."""
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    why: str
    term: int | None = None
    writes: Mapping[str, int] = field(default_factory=dict)
    support: frozenset[str] = frozenset()
    target: str | None = None
    retry_at: float | None = None


@dataclass(frozen=True, slots=True)
class Held:
    term: int
    claims: Mapping[str, int]
    """Store -> sequence of our claim there (landed, not seen overwritten)."""


def decide(
    *,
    families: Mapping[str, FamilyObs],
    n: int,
    me: Me,
    now: float,
    held: Held | None,
    rank: int = 0,
    step: float = 0.1,
    window: float | None = None,
    dropped: int = 0,
    want_since: float = NEG_INF,
    floor: int = 0,
) -> Decision:
    """One decision for one wanted lease. Pure: same inputs, same answer.

    ``n`` is the number of stores of the mesh (quorum is a majority of ``n``, whatever is
    observed); ``dropped`` is the highest term we already stopped holding (never adopted
    again); ``want_since`` is when we started wanting it (a lease free from the start goes
    by rank from then); ``floor`` is the lowest term a new holding may use.
    """
    q = quorum(n)
    win = me.ttl if window is None else window
    verdicts = {b: classify(f, me, window=win, dropped=dropped) for b, f in families.items()}

    if held is not None:
        return _holding(verdicts, held, q, me)
    if not me.valid:
        return Decision(Action.WAIT, "our session is not valid: we cannot hold leases now")

    mine = {b: v for b, v in verdicts.items() if v.kind is Kind.MINE}
    terms = {v.term for v in mine.values()}
    if len(mine) >= q and len(terms) == 1:
        term = terms.pop()
        return Decision(
            Action.HOLD,
            f"our acquisition (term {term}) landed in {len(mine)} stores without an answer: "
            "adopting it",
            term=term,
            support=frozenset(mine),
        )
    free = {b: v for b, v in verdicts.items() if v.kind in (Kind.FREE, Kind.MINE)}
    if len(free) >= q:
        times = sorted(
            max(v.since if v.kind is Kind.FREE else NEG_INF, want_since) for v in free.values()
        )
        at = times[q - 1] + rank * step
        reasons = sorted({v.why for v in free.values() if v.kind is Kind.FREE})
        if now >= at:
            top = max((f.max_term for f in families.values() if f.ready), default=0)
            term = max(top, dropped, floor - 1) + 1
            return Decision(
                Action.ACQUIRE,
                f"acquiring with term {term}: free in {len(free)} of {n} stores "
                f"({'; '.join(reasons) or 'ours'}; rank {rank})",
                term=term,
                writes={b: v.seq for b, v in free.items()},
            )
        return Decision(
            Action.WAIT,
            f"free in {len(free)} of {n} stores; deferring {at - now:.2f}s to better-ranked sites",
            retry_at=at,
        )

    holders: dict[str, dict[str, Verdict]] = {}
    for b, v in verdicts.items():
        if v.kind is Kind.HELD and v.holder is not None:
            holders.setdefault(v.holder, {})[b] = v
    retry = [
        v.since for v in verdicts.values() if v.kind in (Kind.FREE, Kind.UNKNOWN) and v.since > now
    ]
    for holder, vs in sorted(holders.items(), key=lambda kv: -len(kv[1])):
        stale = {b: v for b, v in vs.items() if now >= v.since + v.ttl}
        if stale and len(free) + len(stale) >= q:
            ages = ", ".join(f"{b} {now - v.since:.2f}s" for b, v in sorted(stale.items()))
            return Decision(
                Action.EXPIRE,
                f"session of {holder} unchanged for a full ttl in {len(stale)} stores "
                f"({ages}): expiring it",
                target=holder,
                writes={b: v.session_seq for b, v in stale.items()},
            )
        retry += [v.since + v.ttl for v in vs.values() if now < v.since + v.ttl]
    who = ", ".join(f"{h} in {len(vs)}" for h, vs in sorted(holders.items())) or "nobody"
    unknown = sum(1 for v in verdicts.values() if v.kind is Kind.UNKNOWN)
    tail = f"; {unknown} stores unreachable" if unknown else ""
    return Decision(
        Action.WAIT,
        f"held by {who} of {n} stores, free in {len(free)}{tail}",
        retry_at=min(retry, default=None),
    )


def _holding(verdicts: Mapping[str, Verdict], held: Held, q: int, me: Me) -> Decision:
    if not me.valid:
        return Decision(Action.LOST, "our session is no longer valid", term=held.term)
    overwritten = set()
    for b, seq in held.claims.items():
        v = verdicts.get(b)
        if v is None or v.kind in (Kind.UNKNOWN, Kind.MINE) or v.seq < seq:
            continue  # unreachable, still ours, or our watch has not caught up yet
        overwritten.add(b)  # written after us, or our epoch in that store ended
    landed_late = {b for b, v in verdicts.items() if v.kind is Kind.MINE and v.term == held.term}
    support = (set(held.claims) - overwritten) | landed_late
    if len(support) < q:
        gone = ", ".join(f"{b}: {verdicts[b].why}" for b in sorted(overwritten))
        return Decision(
            Action.LOST,
            f"our claim (term {held.term}) stands in only {len(support)} stores ({gone})",
            term=held.term,
        )
    repair = {b: v.seq for b, v in verdicts.items() if b not in support and v.kind is Kind.FREE}
    tail = f"; repairing {', '.join(sorted(repair))}" if repair else ""
    return Decision(
        Action.HOLD,
        f"we hold it (term {held.term}) in {len(support)} stores{tail}",
        term=held.term,
        support=frozenset(support),
        writes=repair,
    )
