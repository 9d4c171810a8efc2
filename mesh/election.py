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
    live_since: float = NEG_INF
    """Our clock when we first saw the live record's current sequence (its last renewal)."""


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
    to_us: bool = False
    """FREE because its holder handed it over to us: taken at once, whatever our rank."""


def _claim_state(c: ClaimObs, f: FamilyObs, ttl: float) -> tuple[str, float, str]:
    """Is another agent's claim alive in this store? (``live``, ``free`` or ``pending``) and
    from when it stops counting (``pending``) or since when it is free (``free``).

    A claim lives while its claimant's session *in this store* is alive with the claim's
    epoch. Keys are per agent and never deleted, so every claim of the family is looked at,
    not only the newest: a claim written out of turn (a compromised agent writes its keys
    without the compare-and-set) cannot hide the real holder's. An expiry frees the claim
    only a full ttl after we last saw the holder's session renewed: a forged expiry (no
    compare-and-set, written while the holder was renewing) cannot shorten a takeover.
    """
    rec = c.record
    sess = f.sessions.get(c.agent)
    who = c.agent
    if rec is not None and rec.state is not ClaimState.HELD:
        return "free", c.since, f"{rec.state.value} by {who}"
    if sess is None:  # no session here: only a forgetful store does this
        return "pending", c.since + ttl, f"{who} has no session in {f.store}"
    if rec is None or sess.epoch is None:  # unreadable: live until unchanged for a ttl
        return "live", sess.since, f"held by {who}"
    if sess.expired_epoch == rec.epoch:
        return "pending", max(sess.since, sess.live_since + ttl), f"session of {who} expired"
    if sess.epoch != rec.epoch:
        return "free", sess.since, f"{who} opened a new epoch"
    if not sess.alive:
        return "free", sess.since, f"session of {who} closed"
    return "live", sess.since, f"held by {who}"


def classify(f: FamilyObs, me: Me, *, window: float, dropped: int = 0) -> Verdict:
    """One store's view of one lease (see the module docstring)."""
    if not f.ready:
        return Verdict(Kind.UNKNOWN, f"store {f.store} not reachable", since=f.usable_at)
    latest = f.latest
    if latest is None:
        return Verdict(Kind.FREE, "no claim", f.seq, f.since)
    ttl = me.ttl
    live: list[ClaimObs] = []
    until = freed = NEG_INF
    reasons: list[str] = []
    for c in f.claims:
        if c.agent == me.agent:
            continue
        state, at, why = _claim_state(c, f, ttl)
        if state == "live":
            live.append(c)
        elif state == "pending":
            until = max(until, at)
            reasons.append(why)
        else:
            freed = max(freed, at)
            reasons.append(why)
    if live:
        c = max(live, key=lambda c: (c.record.term if c.record else 0, c.seq))
        sess = f.sessions[c.agent]
        return Verdict(
            Kind.HELD,
            f"held by {c.agent}",
            f.seq,
            sess.since,
            holder=c.agent,
            term=c.record.term if c.record is not None else 0,
            session_seq=sess.seq,
            ttl=max(sess.ttl, ttl),
        )
    rec, holder = latest.record, latest.agent
    if rec is not None and rec.state is ClaimState.HANDOVER:
        # Checked before ownership: our own handover to someone else binds us too.
        if rec.to in (me.agent, me.site):
            return Verdict(
                Kind.FREE, f"handed over to us by {holder}", f.seq, max(NEG_INF, until), to_us=True
            )
        return Verdict(
            Kind.FREE,
            f"handed over to {rec.to}, not taken",
            f.seq,
            max(latest.since + window, until),
        )
    ours = next((c for c in f.claims if c.agent == me.agent), None)
    if ours is not None and ours.record is not None:
        r = ours.record
        if r.state is ClaimState.HELD and r.epoch == me.epochs.get(f.store) and r.term > dropped:
            return Verdict(Kind.MINE, f"our claim, term {r.term}", f.seq, term=r.term)
    why = "; ".join(sorted(set(reasons))) or "our own earlier claim"
    if until > NEG_INF:
        return Verdict(Kind.FREE, f"{why} (free once a ttl passed)", f.seq, until)
    return Verdict(Kind.FREE, why, f.seq, max(freed, latest.since if holder == me.agent else freed))


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
    """WAIT: the earliest instant the decision may change if nothing is written."""
    timer_at: float | None = None
    """``retry_at`` without the holders' renewal deadlines: those are the same for every
    lease of a holder, so the lease manager watches them per holder (``holders``)."""
    holders: frozenset[str] = frozenset()
    """WAIT: the live holders whose session, left unrenewed for a ttl, changes this."""


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
    new_step: float | None = None,
) -> Decision:
    """One decision for one wanted lease. Pure: same inputs, same answer.

    ``n`` is the number of stores of the mesh (quorum is a majority of ``n``, whatever is
    observed); ``dropped`` is the highest term we already stopped holding (never adopted
    again); ``want_since`` is when we started wanting it (a lease free from the start goes
    by rank from then); ``floor`` is the lowest term a new holding may use; ``new_step``
    (default ``step``) is the rank step of a lease nobody ever claimed in any store we see:
    a new application, where every agent learns of it at once but not every agent gets to
    it at once (an ``apply`` of a thousand), and waiting costs no running workload.
    """
    q = quorum(n)
    win = me.ttl if window is None else window
    verdicts = {b: classify(f, me, window=win, dropped=dropped) for b, f in families.items()}

    if held is not None:
        return _holding(verdicts, held, q, me, families)
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
        fresh = all(f.ready and not f.claims for f in families.values())
        at = times[q - 1] + rank * (new_step if fresh and new_step is not None else step)
        if any(v.to_us for v in free.values()):
            at = times[q - 1]  # the holder chose us: no better-ranked site to wait for
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
            timer_at=at,
        )

    holders: dict[str, dict[str, Verdict]] = {}
    for b, v in verdicts.items():
        if v.kind is Kind.HELD and v.holder is not None:
            holders.setdefault(v.holder, {})[b] = v
    retry = [
        v.since for v in verdicts.values() if v.kind in (Kind.FREE, Kind.UNKNOWN) and v.since > now
    ]
    timers = list(retry)
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
        timer_at=min(timers, default=None),
        holders=frozenset(holders),
    )


def _same_epoch(f: FamilyObs | None, me: Me, term: int) -> bool:
    """Our own claim in this family still names our live epoch in its store."""
    if f is None:
        return True
    ours = next((c for c in f.claims if c.agent == me.agent), None)
    if ours is None:
        return True  # our watch has not seen our claim yet
    rec = ours.record
    if rec is not None and rec.term < term:
        # Our watch still shows the claim of an earlier tenure (we held this lease before
        # and released or handed it over): our newest claim landed, by compare-and-set,
        # after it, and a watch delivers a key's writes in order, so nothing written after
        # ours has been seen either. Not seen yet is not overwritten (seen: a lease handed
        # back to its previous holder was dropped a millisecond after it was taken).
        return True
    return rec is not None and rec.state is ClaimState.HELD and rec.epoch == me.epochs.get(f.store)


def _holding(
    verdicts: Mapping[str, Verdict],
    held: Held,
    q: int,
    me: Me,
    families: Mapping[str, FamilyObs],
) -> Decision:
    if not me.valid:
        return Decision(Action.LOST, "our session is no longer valid", term=held.term)
    # Our claim stands in a store while our epoch there is the one it names: a legitimate
    # contender only writes over it after that epoch ended (and a newer claim written out
    # of turn by a compromised agent does not end it).
    overwritten = {
        b
        for b, v in verdicts.items()
        if b in held.claims
        and v.kind is not Kind.UNKNOWN
        and v.kind is not Kind.MINE
        and not _same_epoch(families.get(b), me, held.term)
    }
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
