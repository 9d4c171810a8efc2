"""Leases over a quorum of stores: the scheduler that turns observations into writes.

``LeaseManager`` joins the three parts of the lease engine: the observation cache
(``mesh.observe``, fed by one KV watch per store), the pure rules (``mesh.election``) and
the CAS writer (``mesh.writer``). A single loop decides for every wanted lease whose inputs
changed (or whose timer is due) and carries the decision out; a lease never has two writes
in flight. The session (``mesh.session``) runs on its own thread; its changes are marshalled
here with ``call_soon_threadsafe``.

A held lease is valid until ``SessionView.deadline(support)``: the instant until which a
quorum of the stores where our claim stands still have a fresh renewal of the epoch the
claim names. A timer drops it then, whatever the mesh does; ``on_lost`` fires at the latest
at that instant.

The watches and writes are in ``mesh.lease_io`` (a mixin of ``LeaseManager``), the shared
records in ``mesh.lease_model``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

import structlog
from nats.aio.client import Client

from mesh import metrics
from mesh.clock import Clock, boottime, wall_iso, wall_ms
from mesh.election import Action, Decision, Held, Me, decide
from mesh.lease_io import LeaseIO
from mesh.lease_model import (
    HeldLease,
    LeaseStatus,
    SessionSource,
    Tenure,
    WantedLease,
    cancel_and_wait,
)
from mesh.names import (
    lease_claim_key,
    lease_family,
    slot_claim_key,
    slot_family,
)
from mesh.observe import StoreCache
from mesh.records import ClaimState
from mesh.session import SessionView
from mesh.watch import Change, KvWatch
from mesh.writer import Writer

log = structlog.get_logger("mesh.leases")

NEG_INF = float("-inf")


class LeaseManager(LeaseIO):
    """Acquire, hold, release and hand over leases for one agent (see module docstring).

    Callbacks run on the event loop and must not block: ``on_acquired(name, term,
    deadline)``, ``on_lost(name, term, why)`` (stop the workload now), ``on_renewed()``
    (deadlines moved: ``deadline(name)`` has the new values), ``on_observed(name)`` (a
    claim of a wanted lease was written: ``holder_of(name)`` may have changed).
    """

    def __init__(
        self,
        nc: Client,
        session: SessionSource,
        stores: list[str],
        *,
        step: float = 0.1,
        new_step: float | None = None,
        window: float | None = None,
        cas_timeout: float = 2.0,
        watch_heartbeat: float = 1.0,
        max_in_flight: int = 512,
        history: int = 10_000,
        clock: Clock = boottime,
        recreate: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.nc = nc
        self._recreate = recreate
        """Called when a store's stream is gone (deleted, lost): recreate it, if we may."""
        self.session = session
        self.agent = session.agent
        self.site, self.node = self.agent.split("/", 1)
        self.stores = list(stores)
        self.step = step
        self.ttl = session.view().ttl
        self.new_step = max(step, self.ttl / 2) if new_step is None else new_step
        """Rank step of a lease never claimed (a new application): placement order is
        kept even when a better-ranked agent is seconds behind in a mass ``apply``."""
        self.window = self.ttl if window is None else window
        self.clock = clock
        self.writer = Writer(nc, stores, self.site, self.node, cas_timeout=cas_timeout, clock=clock)
        self.caches = {b: StoreCache(b, clock) for b in stores}
        self._heartbeat = watch_heartbeat
        self._watches: dict[str, KvWatch] = {}
        self._watch_tasks: dict[str, asyncio.Task[None]] = {}
        self._created: dict[str, datetime] = {}
        """Creation time of each store as first watched: a different one is a recreation."""
        self._wants: dict[str, WantedLease] = {}
        self._by_family: dict[str, str] = {}
        self._held: dict[str, HeldLease] = {}
        self._dropped: dict[str, int] = {}
        self._decisions: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._timers: dict[str, float] = {}
        """name -> when to decide it again; ``_heap`` orders them (stale entries skipped)."""
        self._heap: list[tuple[float, str]] = []
        self._waiting: dict[str, set[str]] = {}
        """holder -> leases waiting for its session to go a ttl without renewal."""
        self._waits_on: dict[str, frozenset[str]] = {}
        self._stale_seen: dict[tuple[str, str], int] = {}
        """(store, holder) -> the session sequence whose staleness we already announced."""
        self._expiring: dict[tuple[str, str, int], asyncio.Future[None]] = {}
        """(holder, store, sequence) -> the expiry write in flight (one for all leases)."""
        self._backstop = max(30.0, 3 * self.ttl)
        """A waiting lease is decided again at least this often, whatever else happens."""
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._limit = asyncio.Semaphore(max_in_flight)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._view = session.view()
        """The session view every deadline is computed from (``_fresh``)."""
        self._processed = self._view
        """The last view ``_session_changed`` acted on (drops, wake-ups, callbacks)."""
        self._deadlines: dict[tuple[tuple[str, str], ...], float] = {}
        """support -> deadline under the current view (cleared when the view moves)."""
        self._follows: dict[tuple[tuple[str, str], ...], bool] = {}
        """support -> ``follows_session`` under the current view."""
        self._held_now: dict[str, int] | None = None
        self._held_until = NEG_INF
        """``held()`` is cached until the earliest deadline, or until something changes."""
        self._anchors: dict[str, str] = {}
        self.tenures: deque[Tenure] = deque(maxlen=history)
        self.on_acquired: list[Callable[[str, int, float], None]] = []
        self.on_lost: list[Callable[[str, int, str], None]] = []
        self.on_renewed: list[Callable[[], None]] = []
        self.on_observed: list[Callable[[str], None]] = []
        """A claim of a wanted lease was written in some store (its holder may differ)."""

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Watch every store; return once a quorum of them delivered their snapshot (the
        others keep trying in the background). Nothing is acquired before this returns."""
        self._loop = asyncio.get_running_loop()
        self.session.subscribe(self._session_threadsafe)
        for b in self.stores:
            self._watch_tasks[b] = asyncio.create_task(self._keep_watching(b), name=f"watch:{b}")
        need = len(self.stores) // 2 + 1
        deadline = self.clock() + timeout
        while sum(c.ready for c in self.caches.values()) < need:
            if self.clock() > deadline:
                raise TimeoutError(f"fewer than {need} lease stores answered within {timeout:g}s")
            await asyncio.sleep(0.05)
        self._dirty.update(self._wants)

    async def run(self) -> None:
        """The decision loop, for ever (a supervised task of the agent: if it ends, the
        agent must restart, never carry on without anyone deciding)."""
        await self._run()

    def spawn(self) -> asyncio.Task[None]:
        """Run the decision loop as a task this manager owns (tests, benchmarks)."""
        self._loop_task = asyncio.create_task(self._run(), name=f"leases:{self.agent}")
        return self._loop_task

    async def stop(self, release_budget: float = 0.0) -> None:
        """Stop deciding and watching; leases still held are reported lost (no write)."""
        if self._loop_task is not None:
            await cancel_and_wait(self._loop_task)
            self._loop_task = None
        for task in list(self._tasks):
            if release_budget > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), release_budget)
            await cancel_and_wait(task)
        for task in self._watch_tasks.values():
            await cancel_and_wait(task)
        for watch in self._watches.values():
            await watch.stop()
        for name in list(self._held):
            self._drop(name, "lease manager stopped", "stopped")

    # --- public API --------------------------------------------------------------------------

    def want_lease(self, name: str, *, rank: int = 0) -> None:
        """Contend for the stateful lease of application ``name``."""
        self._want(name, lease_claim_key(name, self.site, self.node), lease_family(name), rank)

    def want_slot(self, name: str) -> None:
        """Contend for the stateless slot of ``name`` at our own site."""
        key = slot_claim_key(name, self.site, self.node)
        self._want(f"{name}@{self.site}", key, slot_family(name, self.site), 0)

    def _want(self, name: str, key: str, family: str, rank: int) -> None:
        old = self._wants.get(name)
        if old is not None and old.family != family:
            raise ValueError(f"lease {name} is already wanted in family {old.family}")
        since = old.since if old is not None else self.clock()
        self._wants[name] = WantedLease(name, key, family, rank, since)
        self._by_family[family] = name
        self._touch(name)

    def wanted(self, name: str) -> bool:
        return name in self._wants

    def held(self) -> dict[str, int]:
        """Leases held now: name -> fencing token (term). Every runner asks on every step,
        so the answer is cached until its earliest deadline or the next change: read it,
        never modify it."""
        self._fresh()
        now = self.clock()
        cached = self._held_now
        if cached is not None and now < self._held_until:
            return cached
        out: dict[str, int] = {}
        until = float("inf")
        for n, h in self._held.items():
            d = self.deadline(n)
            if d > now:
                out[n] = h.term
                until = min(until, d)
        self._held_now, self._held_until = out, until
        return out

    def _fresh(self) -> SessionView:
        """Use the session's newest view. The session thread's notifications queue behind
        whatever the main loop is busy with (a start storm of hundreds of workloads); a
        deadline computed from a view that old would make a lease look expired although
        its renewals landed, and every workload would be stopped (issue 17). The view is
        a snapshot published by the session thread: reading it is one attribute load."""
        view = self.session.view()
        if view is not self._view:
            self._view = view
            self._invalidate()
        return view

    def _invalidate(self, name: str | None = None) -> None:
        """The view, or ``name``'s claims, changed: deadlines must be computed again."""
        if name is None:
            self._deadlines.clear()
            self._follows.clear()
        else:
            held = self._held.get(name)
            if held is not None:
                held.changed()
        self._held_now = None

    def open_tenures(self) -> list[Tenure]:
        """Leases held now as tenures ending at their current deadline (if not renewed)."""
        return [
            Tenure(n, h.term, h.start, max(h.start, self.deadline(n)), "held")
            for n, h in self._held.items()
        ]

    def deadline(self, name: str) -> float:
        held = self._held.get(name)
        if held is None:
            return NEG_INF
        self._fresh()
        key = held.key()
        at = self._deadlines.get(key)
        if at is None:
            at = self._deadlines[key] = self._view.deadline(dict(key))
        return at

    def follows_session(self, name: str) -> bool:
        """True when the session's anchored deadline never exceeds this lease's deadline,
        so a fence may follow the session thread's renewals for it directly."""
        held = self._held.get(name)
        if held is None:
            return False
        view = self._fresh()
        key = held.key()
        follows = self._follows.get(key)
        if follows is None:
            support = dict(key)
            anchors = {s.store: s.anchor for s in view.stores.values() if s.anchor}
            follows = bool(anchors) and all(support.get(b) == e for b, e in anchors.items())
            self._follows[key] = follows
        return follows

    def support(self, name: str) -> tuple[tuple[str, str], ...]:
        """The (store, epoch) pairs our claim of ``name`` names; () when not held."""
        held = self._held.get(name)
        return held.key() if held is not None else ()

    def agent_alive(self, agent: str) -> bool:
        """``agent``'s session was seen renewing within a ttl in some store we watch."""
        now = self.clock()
        for cache in self.caches.values():
            obs = cache.session(agent)
            live = obs is not None and obs.alive and obs.expired_epoch != obs.epoch
            if live and obs is not None and now - obs.since < max(obs.ttl, self.ttl):
                return True
        return False

    def live_agents(self) -> list[str]:
        agents = {a for cache in self.caches.values() for a in cache.sessions}
        return sorted(a for a in agents if self.agent_alive(a))

    def holder_of(self, name: str) -> str | None:
        """Who holds ``name`` as our caches show it (informational)."""
        if name in self._held:
            return self.agent
        want = self._wants.get(name)
        if want is None:
            return None
        for cache in self.caches.values():
            latest = cache.family(want.family).latest
            record = latest.record if latest is not None else None
            if latest is not None and record is not None and record.state is ClaimState.HELD:
                return latest.agent
        return None

    def observe(self) -> dict[str, LeaseStatus]:
        out: dict[str, LeaseStatus] = {}
        for name, want in self._wants.items():
            held = self._held.get(name)
            holder = None
            for cache in self.caches.values():
                latest = cache.family(want.family).latest
                record = latest.record if latest is not None else None
                if latest is not None and record is not None and record.state is ClaimState.HELD:
                    holder = latest.agent
                    break
            out[name] = LeaseStatus(
                name=name,
                rank=want.rank,
                held=held is not None,
                term=held.term if held else None,
                holder=self.agent if held else holder,
                deadline=self.deadline(name) if held else None,
                decision=self._decisions.get(name, "not decided yet"),
                support=tuple(sorted(held.claims)) if held else (),
            )
        return out

    # --- inputs --------------------------------------------------------------------------

    def _on_change(self, store: str, change: Change) -> None:
        family, agent = self.caches[store].apply(change.key, change.revision, change.value)
        if family is not None and family in self._by_family:
            name = self._by_family[family]
            self._touch(name)
            for cb in self.on_observed:
                cb(name)
        if agent is not None:
            for fam in self.caches[store].claimed_by.get(agent, ()):
                touched = self._by_family.get(fam)
                if touched is not None:
                    self._touch(touched)

    def _session_threadsafe(self, view: SessionView) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._session_changed)

    def _session_changed(self) -> None:
        """Act on the session's newest view (notifications that queued up while the loop
        was busy collapse into one)."""
        old, view = self._processed, self._fresh()
        if view is old:
            return
        self._processed = view
        epochs_changed = {b: s.epoch for b, s in view.stores.items()} != {
            b: s.epoch for b, s in old.stores.items()
        }
        now = self.clock()
        for name in list(self._held):
            if self.deadline(name) <= now:
                self._drop(name, "validity ran out without a quorum of renewals", "session")
        # Every lease is decided again when our epochs change, while the session is not
        # valid, and when it becomes valid again: a lease that waited because "our session
        # is not valid" has no other event (renewals resumed in the same epochs after a
        # lost quorum came back) and sat until its backstop, 30 s after the quorum returned.
        if epochs_changed or not view.valid(now) or not old.valid(now):
            self._dirty.update(self._wants)
            self._wake.set()
        self._update_anchors()
        for cb in self.on_renewed:
            cb()

    def _update_anchors(self) -> None:
        for b, s in self._view.stores.items():
            if not s.live or s.anchor == s.epoch:
                continue
            if all(h.claims.get(b, (0, ""))[1] == s.epoch for h in self._held.values()):
                self.session.anchor(b, s.epoch)

    # --- the decision loop ------------------------------------------------------------------

    def _touch(self, name: str) -> None:
        self._dirty.add(name)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            heap = self._heap
            while heap and heap[0][0] <= now:
                at, name = heapq.heappop(heap)
                if self._timers.get(name) == at:
                    del self._timers[name]
                    self._dirty.add(name)
            dirty, self._dirty = self._dirty, set()
            for name in dirty:
                want = self._wants.get(name)
                if want is not None and name not in self._in_flight:
                    self._step(want, now)
            while heap and self._timers.get(heap[0][1]) != heap[0][0]:
                heapq.heappop(heap)  # overwritten or cancelled
            self.held()  # the earliest deadline of a held lease: _held_until
            stale_at = self._check_stale(self.clock())  # after the steps: new waiters too
            due = min(heap[0][0] if heap else float("inf"), self._held_until, stale_at)
            timeout = max(0.0, due - self.clock()) if due < float("inf") else None
            if self._dirty:
                timeout = 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            now = self.clock()
            for name in list(self._held):
                if self.deadline(name) <= now:
                    self._drop(name, "validity ran out without a quorum of renewals", "session")

    def _set_timer(self, name: str, at: float) -> None:
        self._timers[name] = at
        heapq.heappush(self._heap, (at, name))

    def _wait_on(self, name: str, holders: frozenset[str]) -> None:
        """``name`` now waits for these holders' sessions to go stale (and no others)."""
        old = self._waits_on.get(name, frozenset())
        if old == holders:
            return
        for agent in old - holders:
            waiting = self._waiting.get(agent)
            if waiting is not None:
                waiting.discard(name)
                if not waiting:
                    del self._waiting[agent]
        for agent in holders - old:
            self._waiting.setdefault(agent, set()).add(name)
        if holders:
            self._waits_on[name] = holders
        else:
            self._waits_on.pop(name, None)

    def _check_stale(self, now: float) -> float:
        """Wake the leases waiting on a holder whose session, in some store, just went a
        full ttl without renewal (when ``decide`` may expire it); return when the next one
        may. One check per holder and store instead of a timer per lease: a renewal moves
        every lease's wait at once, and 1,000 per-lease timers re-decided each lease
        once per ttl for nothing while the holder was healthy (issue 17)."""
        next_at = float("inf")
        for agent, names in self._waiting.items():
            for b, cache in self.caches.items():
                sess = cache.sessions.get(agent)
                if sess is None or not sess.alive:
                    continue
                at = sess.since + max(sess.ttl, self.ttl)
                if now < at:
                    next_at = min(next_at, at)
                elif self._stale_seen.get((b, agent)) != sess.seq:
                    self._stale_seen[(b, agent)] = sess.seq
                    self._dirty.update(names)
        return next_at

    def _me(self, now: float) -> Me:
        view = self._fresh()
        return Me(
            agent=self.agent,
            site=self.site,
            epochs={b: view.epoch(b) for b in self.stores},
            valid=view.valid(now),
            ttl=self.ttl,
        )

    def decide(self, want: WantedLease, now: float) -> Decision:
        held = self._held.get(want.name)
        return decide(
            families={b: c.family(want.family) for b, c in self.caches.items()},
            n=len(self.stores),
            me=self._me(now),
            now=now,
            held=Held(held.term, {b: seq for b, (seq, _) in held.claims.items()}) if held else None,
            rank=want.rank,
            step=self.step,
            window=self.window,
            dropped=self._dropped.get(want.name, 0),
            want_since=want.since,
            floor=wall_ms(),
            new_step=self.new_step,
        )

    def _step(self, want: WantedLease, now: float) -> None:
        d = self.decide(want, now)
        if self._decisions.get(want.name) != d.why:
            self._decisions[want.name] = d.why
            log.debug(
                "lease_decision",
                msg=f"lease {want.name}: {d.why}",
                lease=want.name,
                action=str(d.action),
            )
        held = self._held.get(want.name)
        if d.action is Action.HOLD and d.term is not None:
            if held is None:
                self._adopt(want, d)
            else:
                gone = set(held.claims) - d.support
                for b in gone:
                    del held.claims[b]
                if gone:
                    self._invalidate(want.name)
                if d.writes:
                    self._spawn(want.name, self._claim(want, d, repair=True))
            self._update_anchors()
        elif d.action is Action.LOST:
            self._drop(want.name, d.why, "rewritten")
        elif d.action is Action.ACQUIRE:
            self._spawn(want.name, self._claim(want, d, repair=False))
        elif d.action is Action.EXPIRE and d.target is not None:
            self._spawn(want.name, self._expire(want, d))
        elif d.action is Action.WAIT:
            at = d.timer_at
            backstop = now + self._backstop
            self._set_timer(want.name, backstop if at is None else min(at, backstop))
        self._wait_on(want.name, d.holders if d.action is Action.WAIT else frozenset())

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self._in_flight.add(name)

        async def guarded() -> None:
            try:
                async with self._limit:
                    await coro
            except Exception as exc:
                log.error(
                    "lease_write_failed",
                    msg=f"write for lease {name} failed: {exc!r}",
                    lease=name,
                    error=repr(exc),
                )
            finally:
                self._in_flight.discard(name)
                self._touch(name)

        task = asyncio.create_task(guarded(), name=f"lease:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- writes ------------------------------------------------------------------------------

    # --- bookkeeping ------------------------------------------------------------------------

    def _adopt(self, want: WantedLease, d: Decision) -> None:
        assert d.term is not None
        claims = {}
        for b in d.support:
            latest = self.caches[b].family(want.family).latest
            if latest is not None and latest.record is not None:
                claims[b] = (latest.seq, latest.record.epoch)
        self._gain(want, HeldLease(d.term, self.clock(), claims))

    def _gain(self, want: WantedLease, held: HeldLease) -> None:
        self._held[want.name] = held
        held.changed()
        deadline = self.deadline(want.name)
        cached = self._held_now  # kept up to date, not recomputed: gains come in hundreds
        if cached is not None and deadline > self.clock():
            cached[want.name] = held.term
            self._held_until = min(self._held_until, deadline)
        metrics.ACQUISITIONS.inc()
        metrics.LEASES_HELD.inc()
        log.info(
            "lease_acquired",
            msg=f"acquired lease {want.name} with token {held.term}",
            lease=want.name,
            term=held.term,
            deadline=wall_iso(deadline, self.clock),
            stores=sorted(held.claims),
        )
        self._update_anchors()
        for cb in self.on_acquired:
            cb(want.name, held.term, deadline)

    def _drop(self, name: str, why: str, reason: str) -> None:
        held = self._held.pop(name, None)
        if held is None:
            return
        if self._held_now is not None:
            self._held_now.pop(name, None)
        self._dropped[name] = max(held.term, self._dropped.get(name, 0))
        end = min(self.clock(), self._view.deadline(held.support()))
        self.tenures.append(Tenure(name, held.term, held.start, max(held.start, end), why))
        metrics.LEASES_HELD.dec()
        metrics.LOSSES.labels(reason).inc()
        log.info(
            "lease_lost",
            msg=f"no longer hold lease {name} (token {held.term}): {why}",
            lease=name,
            term=held.term,
            reason=reason,
            deadline=wall_iso(self._view.deadline(held.support()), self.clock),
        )
        for cb in self.on_lost:
            cb(name, held.term, why)
        if name in self._wants:
            self._touch(name)
