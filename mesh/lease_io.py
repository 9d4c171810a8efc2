"""The lease manager's I/O: one KV watch per store, and every compare-and-set it writes
(claims, repairs, withdrawals, expiries of dead sessions, releases and handovers).

A mixin of ``LeaseManager`` (it shares the manager's state): ``mesh.leases`` keeps the
decision loop and the bookkeeping, so that each can be read in one sitting. Nothing here
decides; every write carries out a ``Decision`` of ``mesh.election`` or a caller's release.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import structlog
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from mesh import metrics
from mesh.clock import Clock
from mesh.election import Decision
from mesh.lease_model import HeldLease, WantedLease
from mesh.names import expiry_key, store_bucket
from mesh.observe import StoreCache
from mesh.records import ClaimRecord, ClaimState, ExpiryRecord
from mesh.session import SessionView
from mesh.watch import Change, KvWatch
from mesh.writer import Writer

log = structlog.get_logger("mesh.leases")

StopHook = Callable[[], Awaitable[None]]
NEG_INF = float("-inf")


class LeaseIO:
    """Watches and writes of one agent's ``LeaseManager`` (see the module docstring)."""

    # The manager's state this part reads and writes (set in ``LeaseManager.__init__``).
    nc: Client
    site: str
    node: str
    stores: list[str]
    step: float
    ttl: float
    clock: Clock
    writer: Writer
    caches: dict[str, StoreCache]
    _recreate: Callable[[str], Awaitable[None]] | None
    _heartbeat: float
    _watches: dict[str, KvWatch]
    _created: dict[str, datetime]
    _wants: dict[str, WantedLease]
    _by_family: dict[str, str]
    _held: dict[str, HeldLease]
    _dirty: set[str]
    _timers: dict[str, float]
    _expiring: dict[tuple[str, str, int], asyncio.Future[None]]
    _tasks: set[asyncio.Task[Any]]
    _wake: asyncio.Event
    _view: SessionView

    # The manager's own calls this part uses (defined in ``LeaseManager``).
    def _fresh(self) -> SessionView:
        raise NotImplementedError

    def _invalidate(self, name: str | None = None) -> None:
        raise NotImplementedError

    def _on_change(self, store: str, change: Change) -> None:
        raise NotImplementedError

    def _update_anchors(self) -> None:
        raise NotImplementedError

    def _set_timer(self, name: str, at: float) -> None:
        raise NotImplementedError

    def _wait_on(self, name: str, holders: frozenset[str]) -> None:
        raise NotImplementedError

    def _gain(self, want: WantedLease, held: HeldLease) -> None:
        raise NotImplementedError

    def _drop(self, name: str, why: str, reason: str) -> None:
        raise NotImplementedError

    # --- watches ----------------------------------------------------------------------------

    async def _keep_watching(self, store: str) -> None:
        backoff = 0.2
        while True:
            cache = self.caches[store]
            watch = KvWatch(
                self.nc,
                store_bucket(store),
                ">",
                lambda ch, b=store: self._on_change(b, ch),  # type: ignore[misc]
                heartbeat=self._heartbeat,
            )
            try:
                cache.reset()
                await watch.start()
                self._watches[store] = watch
                await watch.ready.wait()
                known = self._created.get(store)
                recreated = known is not None and watch.created != known
                if watch.created is not None:
                    self._created[store] = watch.created
                cache.mark_ready(recreated=recreated, quarantine=self.ttl)
                log.info(
                    "lease_store_watched",
                    msg=f"watching lease store {store}"
                    + (" (recreated: ignored for a ttl)" if recreated else ""),
                    store=store,
                    quarantined=recreated,
                )
                if recreated:  # decide again when the quarantine ends
                    for name in self._wants:
                        self._set_timer(
                            name, min(self._timers.get(name, float("inf")), cache.quarantine_until)
                        )
                self._dirty.update(self._wants)
                self._wake.set()
                backoff = 0.2
                await watch.closed.wait()
                log.warning(
                    "lease_store_watch_ended",
                    msg=f"watch of lease store {store} ended; restarting it",
                    store=store,
                )
            except NotFoundError:
                log.error("lease_store_gone", msg=f"lease store {store} is gone", store=store)
                if self._recreate is not None:
                    with contextlib.suppress(Exception):
                        await self._recreate(store)
                        log.warning(
                            "lease_store_recreated",
                            msg=f"recreated lease store {store}",
                            store=store,
                        )
            except (TimeoutError, NatsError, OSError) as exc:
                (log.warning if backoff == 0.2 else log.debug)(  # first failure of a streak
                    "lease_store_unreachable",
                    msg=f"cannot watch lease store {store}: {exc!r}; retrying",
                    store=store,
                    error=repr(exc),
                )
            finally:
                await watch.stop()
            self._dirty.update(self._wants)
            self._wake.set()
            await asyncio.sleep(backoff + random.random() * backoff)
            backoff = min(backoff * 2, 5.0)

    # --- release and handover ---------------------------------------------------------------

    async def release(
        self, name: str, *, to: str | None = None, stop: StopHook | None = None
    ) -> bool:
        """Stop wanting ``name``; if held: await ``stop()``, stop believing, then write
        ``released`` (or a handover to ``to``, an agent id or a site) in every store where
        our claim stands. The writes finish in the background even if the caller is
        cancelled (the store shows them done, or shows someone else's write). Returns True
        when a quorum of stores took it before the session deadline."""
        want = self._wants.pop(name, None)
        if want is not None:
            self._by_family.pop(want.family, None)
            self._timers.pop(name, None)
            self._wait_on(name, frozenset())
        held = self._held.get(name)
        if held is None or want is None:
            if held is not None:
                self._drop(name, "released", "released")
            return False
        if stop is not None:
            await stop()
        if self._held.get(name) is not held:
            return False  # lost while stopping: nothing of ours to release any more
        why = "released" if to is None else f"handed over to {to}"
        self._drop(name, why, "released")
        state = ClaimState.RELEASED if to is None else ClaimState.HANDOVER
        quorum = asyncio.Event()
        done: list[str] = []

        async def one(store: str, seq: int, epoch: str) -> None:
            record = ClaimRecord(epoch, held.term, state, to, self.ttl)
            end = await self.writer.retract(store, want.key, want.family, seq, record, NEG_INF)
            if end == "done":
                done.append(store)
                if len(done) >= len(self.stores) // 2 + 1 and not quorum.is_set():
                    quorum.set()
                    log.info(
                        "lease_released" if to is None else "lease_handed_over",
                        msg=f"lease {name} (token {held.term}) {why}",
                        lease=name,
                        term=held.term,
                        to=to,
                        stores=sorted(done),
                    )

        for b, (seq, epoch) in held.claims.items():
            task = asyncio.create_task(one(b, seq, epoch), name=f"release:{name}:{b}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        budget = max(2 * self.ttl, self._view.deadline() - self.clock())
        try:
            await asyncio.wait_for(asyncio.shield(quorum.wait()), budget)
        except TimeoutError:
            log.warning(
                "lease_release_unconfirmed",
                msg=f"release of lease {name} not confirmed by a quorum yet; still retrying",
                lease=name,
            )
            return False
        return True

    # --- claims and expiries ----------------------------------------------------------------

    def _records(self, term: int, stores: list[str]) -> dict[str, ClaimRecord] | None:
        view = self._fresh()
        records = {}
        for b in stores:
            epoch = view.epoch(b)
            if not epoch:
                return None
            records[b] = ClaimRecord(epoch, term, ClaimState.HELD, None, self.ttl)
        return records

    async def _claim(self, want: WantedLease, d: Decision, *, repair: bool) -> None:
        assert d.term is not None
        writes = {b: seq for b, seq in d.writes.items() if self._view.epoch(b)}
        records = self._records(d.term, list(writes))
        if not writes or records is None:
            return
        results = await self.writer.claim(want.key, want.family, writes, records)
        landed = {b: (r.seq, records[b].epoch) for b, r in results.items() if r.seq is not None}
        for b, r in results.items():
            if r.conflict:
                await self._refresh(b, want.family)
        held = self._held.get(want.name)
        if repair:
            if held is not None and held.term == d.term and landed:
                held.claims.update(landed)
                self._invalidate(want.name)
                log.info(
                    "lease_claim_repaired",
                    msg=f"claim of lease {want.name} repaired in {', '.join(sorted(landed))}",
                    lease=want.name,
                    stores=sorted(landed),
                )
                self._update_anchors()
            return
        now = self.clock()
        if self._wants.get(want.name) is not want or held is not None:
            await self._undo(want, d.term, landed)
            return
        claim = HeldLease(d.term, now, landed)
        if self._view.deadline(claim.support()) > now:
            self._gain(want, claim)
        elif landed:
            log.info(
                "lease_race_lost",
                msg=f"lost the race for lease {want.name}; withdrawing our claim",
                lease=want.name,
                landed=sorted(landed),
            )
            await self._undo(want, d.term, landed)
            self._set_timer(want.name, now + random.uniform(0.05, 0.05 + self.step * 2))

    async def _undo(self, want: WantedLease, term: int, landed: dict[str, tuple[int, str]]) -> None:
        until = self.clock() + self.ttl
        await asyncio.gather(
            *(
                self.writer.retract(
                    b, want.key, want.family, seq, ClaimRecord(ep, term, ClaimState.RELEASED), until
                )
                for b, (seq, ep) in landed.items()
            )
        )

    async def _expire(self, want: WantedLease, d: Decision) -> None:
        """Expire ``d.target``'s session where ``d`` says. Every lease of a dead holder
        decides the same expiry at the same instant: one write per store and sequence is
        made, the other leases wait for it (hundreds of identical compare-and-sets, all
        but one conflicting, were most of a mass takeover). A landed expiry is applied to
        our cache at once, so the waiting leases decide again on it, not on the old state."""
        target = d.target
        assert target is not None
        writes: dict[str, tuple[int, str]] = {}
        waits: list[asyncio.Future[None]] = []
        mine: list[tuple[str, int, str]] = []
        loop = asyncio.get_running_loop()
        for b, seq in d.writes.items():
            pending = self._expiring.get((target, b, seq))
            if pending is not None:
                waits.append(pending)
                continue
            obs = self.caches[b].session(target)
            epoch = obs.epoch if obs is not None and obs.epoch else ""
            writes[b] = (seq, epoch)
            mine.append((b, seq, epoch))
            self._expiring[(target, b, seq)] = loop.create_future()
        try:
            results = await self.writer.expire(target, writes) if writes else {}
        finally:
            for b, seq, _ in mine:
                done = self._expiring.pop((target, b, seq), None)
                if done is not None and not done.done():
                    done.set_result(None)
        site, node = target.split("/", 1)
        key = expiry_key(site, node, self.site, self.node)
        for b, _, epoch in mine:
            r = results.get(b)
            if r is not None and r.seq is not None:
                self._on_change(b, Change(key, r.seq, ExpiryRecord(epoch).encode()))
        ok = sorted(b for b, r in results.items() if r.ok)
        if ok:
            metrics.SESSION_EXPIRIES.inc()
            log.info(
                "peer_session_expired",
                msg=f"expired the session of {target} in {', '.join(ok)}: {d.why}",
                session=target,
                stores=ok,
            )
        for b, r in results.items():
            if r.conflict:
                await self._refresh(b, f"sess.{target.replace('/', '.')}.>")
        if waits:
            await asyncio.gather(*(asyncio.shield(w) for w in waits))

    async def _refresh(self, store: str, family: str) -> None:
        """A CAS conflict means our watch is behind: read the family's newest entry now."""
        with contextlib.suppress(Exception):
            entry = await self.writer.last(store, family)
            if entry is not None:
                self._on_change(store, Change(entry.key, entry.seq, entry.value or None))
