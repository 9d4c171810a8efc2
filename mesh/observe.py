"""The observation cache: what each store's watch showed, as the inputs ``decide`` reads.

Pure bookkeeping (no I/O): ``StoreCache.apply`` takes one store entry (from the watch, or
from a direct get after a failed CAS) and updates sessions and lease families; the lease
manager asks it for ``FamilyObs`` per store. Times are the observer's own clock: *since*
is when we first saw a sequence, which is what "unchanged for a full ttl" is measured from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.clock import Clock
from mesh.election import ClaimObs, FamilyObs, SessionObs
from mesh.records import parse_claim, parse_expiry, parse_key, parse_session

NEG_INF = float("-inf")


@dataclass
class _Session:
    seq: int = 0
    since: float = NEG_INF
    live_seq: int = 0
    epoch: str | None = None
    alive: bool = False
    ttl: float = 0.0
    expiries: dict[str, tuple[int, str]] = field(default_factory=dict)
    """contender -> (seq, epoch it expired)."""

    live_since: float = NEG_INF

    def obs(self) -> SessionObs:
        newest = max(self.expiries.values(), default=(0, ""))
        expired = newest[1] if newest[0] > self.live_seq else None
        return SessionObs(
            self.seq, self.since, self.epoch, self.alive, self.ttl, expired, self.live_since
        )


@dataclass
class _Family:
    seq: int = 0
    since: float = NEG_INF
    claims: dict[str, ClaimObs] = field(default_factory=dict)


class StoreCache:
    """One store: the sessions and claim families its watch delivered."""

    def __init__(self, store: str, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.ready = False
        self.ready_at = NEG_INF
        self.quarantine_until = NEG_INF
        """A store recreated under us counts for nothing until then (docs/leases.md)."""
        self.sessions: dict[str, _Session] = {}
        self.families: dict[str, _Family] = {}
        self.claimed_by: dict[str, set[str]] = {}
        """agent -> families where it has a claim (to wake the right leases)."""
        self._seen: dict[str, int] = {}
        """key -> last sequence applied (the watch may deliver an entry twice)."""

    def reset(self) -> None:
        """The watch restarts from scratch (its server came back, or the store was
        recreated): forget everything, it is delivered again."""
        self.ready = False
        self.sessions.clear()
        self.families.clear()
        self.claimed_by.clear()
        self._seen.clear()

    def mark_ready(self, *, recreated: bool, quarantine: float) -> None:
        now = self.clock()
        self.ready, self.ready_at = True, now
        if recreated:
            self.quarantine_until = now + quarantine

    def usable(self, now: float) -> bool:
        return self.ready and now >= self.quarantine_until

    def apply(self, key: str, seq: int, value: bytes | None) -> tuple[str | None, str | None]:
        """Record one entry. Returns (lease family touched, agent whose session changed)."""
        if seq <= self._seen.get(key, 0):
            return None, None  # redelivered
        self._seen[key] = seq
        parts = parse_key(key)
        now = self.clock()
        if parts.kind in ("session", "expiry"):
            sess = self.sessions.setdefault(parts.agent, _Session())
            if parts.kind == "session":
                rec = parse_session(value, key, seq) if value else None
                sess.live_seq = seq
                sess.live_since = now
                sess.epoch = rec.epoch if rec is not None else None
                sess.alive = rec is not None and rec.state.value == "alive"
                sess.ttl = rec.ttl if rec is not None else 0.0
            else:
                exp = parse_expiry(value, key, seq) if value else None
                if exp is not None:
                    sess.expiries[parts.by] = (seq, exp.epoch)
            if seq > sess.seq:
                sess.seq, sess.since = seq, now
            return None, parts.agent
        if parts.kind in ("lease", "slot"):
            fam = self.families.setdefault(parts.family, _Family())
            record = parse_claim(value, key, seq) if value else None
            fam.claims[parts.agent] = ClaimObs(parts.agent, seq, now, record)
            self.claimed_by.setdefault(parts.agent, set()).add(parts.family)
            if seq > fam.seq:
                fam.seq, fam.since = seq, now
            return parts.family, None
        return None, None

    def family(self, family: str, *, since_floor: float = NEG_INF) -> FamilyObs:
        """The lease family as ``decide`` wants it (with its claimants' sessions)."""
        fam = self.families.get(family)
        usable_at = self.quarantine_until if self.ready else NEG_INF
        if fam is None:
            since = max(self.ready_at, since_floor)
            return FamilyObs(self.store, self.usable(self.clock()), 0, since, usable_at=usable_at)
        sessions = {
            agent: self.sessions[agent].obs() for agent in fam.claims if agent in self.sessions
        }
        return FamilyObs(
            self.store,
            self.usable(self.clock()),
            fam.seq,
            fam.since,
            tuple(fam.claims.values()),
            sessions,
            usable_at,
        )

    def session(self, agent: str) -> SessionObs | None:
        sess = self.sessions.get(agent)
        return sess.obs() if sess is not None else None
