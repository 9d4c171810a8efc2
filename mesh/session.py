"""An agent's session: one record per lease store, renewed by family compare-and-set.

Why a session: renewing 1,000 leases one by one costs 1,000 writes per ttl. Leases are bound
to the holder's session instead (as Consul does), so renewal costs one write per store per
ttl/3, whatever the number of leases held.

Why one record per store and a quorum: each store is a single-replica bucket on one site
(``mesh.stores``), so there is no Raft election on this path. The session is valid while a
*quorum* of stores has a fresh renewal; one store going dark (its site cut off) changes
nothing, and a contender must expire the session in a quorum of stores before it may take a
lease over (docs/leases.md has the argument).

The rules, per store ``b`` (``SessionCore``):

* Every write is a CAS over the family ``sess.<site>.<node>.>`` at the sequence of our own
  last write there, so any foreign write (a contender's expiry, a duplicate agent, a
  recreated store) makes our next renewal fail: we learn at once that ``b`` is lost.
* ``fresh_until[b]`` = the CLOCK_BOOTTIME time at which we *sent* the last renewal that
  landed + ttl - margin. A renewal that fails or times out extends nothing.
* An epoch is never re-armed in a store after a foreign write: we open a new epoch there
  (a new id), and claims naming the old one are dead in ``b`` (the lease manager repairs
  them). Re-arming the same epoch would let a contender's expiry in ``b`` be undone behind
  its back (docs/leases.md, "why never re-arm").
* A store we could not reach for a while is simply renewed again by CAS over our own last
  sequence: if nobody wrote the family meanwhile, no contender counted it as expired.
* ``open`` never overwrites a live epoch that is not ours at once (a previous incarnation
  killed a moment ago, or a duplicate agent): it waits until that record stayed unchanged
  for a full ttl, as a contender would.

``SessionThread`` runs all of this on its own thread with its own event loop and NATS
connection, so renewals never wait for the agent's main loop (a start storm of 1,000
workloads, a slow status request): local work cannot starve them. A watchdog still stops
renewing when the main loop has not stamped progress for ``stall_limit`` seconds, so a
wedged agent lets its leases go instead of holding them for ever (Patroni's rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import structlog
from nats.aio.client import Client

from mesh import metrics
from mesh.clock import Clock, boottime, wall_iso
from mesh.names import session_family, session_key
from mesh.records import SessionRecord, SessionState, parse_session
from mesh.stores import Entry, Store, StoreError, quorum_deadline

log = structlog.get_logger("mesh.session")

NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class StoreSession:
    """Our session in one store, as of the last renewal attempt."""

    store: str
    epoch: str = ""
    """Our epoch in this store ("" until opened)."""
    seq: int = 0
    """Family sequence of our last write that we know landed."""
    fresh_until: float = NEG_INF
    """CLOCK_BOOTTIME instant until which this store counts for us."""
    live: bool = False
    """Opened and not lost since (a lapse keeps it live: renewing resumes it)."""
    anchor: str = ""
    """The epoch the lease manager's claims in this store name (fence deadline)."""
    error: str = ""


@dataclass(frozen=True, slots=True)
class SessionView:
    """An immutable snapshot of the session, safe to read from any thread."""

    agent: str
    ttl: float
    margin: float
    stores: Mapping[str, StoreSession]
    closed: bool = False

    @property
    def n(self) -> int:
        return len(self.stores)

    def epoch(self, store: str) -> str:
        s = self.stores.get(store)
        return s.epoch if s is not None and s.live else ""

    def deadline(self, support: Mapping[str, str] | None = None) -> float:
        """Until when a quorum of stores is fresh; with ``support`` (store -> epoch), only
        stores whose live epoch is still that one count (a claim's view of validity)."""
        if self.closed:
            return NEG_INF
        values = [
            s.fresh_until
            for s in self.stores.values()
            if s.live and (support is None or support.get(s.store) == s.epoch)
        ]
        return quorum_deadline(values, self.n)

    def anchored_deadline(self) -> float:
        """Validity counting only stores whose epoch is the anchored one: what the fence
        may extend a workload to without asking the main loop."""
        return self.deadline({s.store: s.anchor for s in self.stores.values() if s.anchor})

    def valid(self, now: float) -> bool:
        return now < self.deadline()


class SessionCore:
    """The per-store renewal logic on whatever event loop runs it (a thread in the agent,
    the test's loop in unit tests)."""

    def __init__(
        self,
        nc: Client,
        stores: list[str],
        site: str,
        node: str,
        *,
        ttl: float,
        margin: float,
        clock: Clock = boottime,
        cas_timeout: float = 2.0,
    ) -> None:
        if not 0 <= margin < ttl:
            raise ValueError("margin must be in [0, ttl)")
        self.agent = f"{site}/{node}"
        self.ttl = ttl
        self.margin = margin
        self.clock = clock
        self.cas_timeout = cas_timeout
        self.key = session_key(site, node)
        self.family = session_family(site, node)
        self.stores = {name: Store(nc, name) for name in stores}
        self._state = {name: StoreSession(name) for name in stores}
        self._counter = 0
        self._sent: dict[str, dict[int, float]] = {name: {} for name in stores}
        self._own_epochs: set[str] = set()
        self._closed = False
        self.on_change: list[Callable[[SessionView], None]] = []

    @property
    def interval(self) -> float:
        return self.ttl / 3

    def view(self) -> SessionView:
        return SessionView(self.agent, self.ttl, self.margin, dict(self._state), self._closed)

    def _set(self, store: str, **changes: object) -> None:
        self._state[store] = replace(self._state[store], **changes)  # type: ignore[arg-type]

    def _changed(self) -> None:
        view = self.view()
        for cb in list(self.on_change):
            try:
                cb(view)
            except Exception as exc:
                log.error(
                    "session_callback_failed",
                    msg=f"session callback failed: {exc!r}",
                    error=repr(exc),
                )

    def anchor(self, store: str, epoch: str) -> None:
        if store in self._state:
            self._set(store, anchor=epoch)

    # --- one store ---------------------------------------------------------------------------

    def _record(self, store: str, epoch: str, state: SessionState, sent: float) -> bytes:
        self._counter += 1
        sent_map = self._sent[store]
        sent_map[self._counter] = sent
        for old in [k for k in sent_map if k <= self._counter - 16]:
            del sent_map[old]
        return SessionRecord(epoch, state, self.ttl, self._counter).encode()

    def _landed(self, store: str, sent: float, seq: int) -> None:
        s = self._state[store]
        self._set(
            store,
            seq=seq,
            fresh_until=max(s.fresh_until, sent + self.ttl - self.margin),
            error="",
        )

    async def _wait_unchanged(self, store: Store, seq: int, ttl: float) -> bool:
        """Poll a live foreign record; True once it stayed at ``seq`` for a full ttl."""
        log.warning(
            "session_duplicate_wait",
            msg=f"our agent id already has a live session in store {store.name} (a duplicate "
            "agent, or a restart right after a crash): waiting for it to stay unchanged for "
            f"a full ttl ({ttl:g}s)",
            store=store.name,
            ttl=ttl,
        )
        until = self.clock() + ttl
        while self.clock() < until:
            await asyncio.sleep(min(0.25, max(0.0, until - self.clock())))
            try:
                entry = await store.last(self.family, self.cas_timeout)
            except StoreError:
                return False
            if entry is None or entry.seq != seq:
                return False
        return True

    async def open(self, name: str) -> bool:
        """Start a new epoch in one store by CAS over whatever the family holds."""
        store = self.stores[name]
        epoch = uuid.uuid4().hex[:16]
        self._own_epochs.add(epoch)
        for _ in range(5):
            try:
                entry = await store.last(self.family, self.cas_timeout)
                expect = 0 if entry is None else entry.seq
                if entry is not None and entry.key == self.key:
                    rec = parse_session(entry.value, entry.key, entry.seq)
                    foreign = rec is None or (
                        rec.state is SessionState.ALIVE and rec.epoch not in self._own_epochs
                    )
                    ttl = max(self.ttl, rec.ttl if rec is not None else 0.0)
                    if foreign and not await self._wait_unchanged(store, entry.seq, ttl):
                        continue
                sent = self.clock()
                seq = await store.cas(
                    self.key,
                    self._record(name, epoch, SessionState.ALIVE, sent),
                    self.family,
                    expect,
                    self.cas_timeout,
                )
            except StoreError as exc:
                if exc.conflict:
                    continue
                self._set(name, error=str(exc))
                return False
            anchor = self._state[name].anchor or epoch
            self._set(name, epoch=epoch, seq=0, fresh_until=NEG_INF, live=True, anchor=anchor)
            self._landed(name, sent, seq)
            log.info(
                "session_opened",
                msg=f"session opened in store {name} (epoch {epoch})",
                store=name,
                epoch=epoch,
                seq=seq,
            )
            return True
        return False

    async def renew(self, name: str) -> bool:
        """One CAS renewal in one store; True when it landed (or our late write did)."""
        s = self._state[name]
        if not s.live:
            return await self.open(name)
        store = self.stores[name]
        sent = self.clock()
        left = s.fresh_until - sent
        timeout = max(0.05, min(self.interval, left)) if left > 0 else self.interval
        try:
            seq = await store.cas(
                self.key,
                self._record(name, s.epoch, SessionState.ALIVE, sent),
                self.family,
                s.seq,
                min(timeout, self.cas_timeout),
            )
        except StoreError as exc:
            if not exc.conflict:
                self._set(name, error=str(exc))
                metrics.RENEW_FAILURES.labels("error").inc()
                return False
            return await self._after_conflict(name, s)
        metrics.RENEW_SECONDS.observe(self.clock() - sent)
        if self._state[name].epoch == s.epoch and self._state[name].live:
            self._landed(name, sent, seq)
        return True

    async def _after_conflict(self, name: str, s: StoreSession) -> bool:
        """Our CAS failed: adopt a late write of our own, or give the epoch up here."""
        store = self.stores[name]
        try:
            entry = await store.last(self.family, self.cas_timeout)
        except StoreError as exc:
            self._set(name, error=str(exc))
            return False
        if entry is not None and entry.key == self.key:
            rec = parse_session(entry.value, entry.key, entry.seq)
            sent = self._sent[name].get(rec.seq) if rec is not None else None
            if rec is not None and rec.epoch == s.epoch and sent is not None:
                self._landed(name, sent, entry.seq)
                return True
        who = entry.key if entry is not None else "the family is gone (store recreated?)"
        log.warning(
            "session_store_lost",
            msg=f"session lost in one store ({name}): foreign write ({who}); opening a new epoch",
            store=name,
            by=who,
        )
        metrics.RENEW_FAILURES.labels("lost").inc()
        self._set(name, live=False, fresh_until=NEG_INF, error=f"lost: {who}")
        self._changed()
        return await self.open(name)

    async def close_store(self, name: str) -> None:
        """Write ``closed`` over our last sequence (retrying over our own late writes).

        A store where we are not live may still hold an ``alive`` record of ours: an open
        cancelled by the close after its write landed. That ghost is closed too, so no
        contender waits a full ttl for a session nobody renews."""
        store = self.stores[name]
        if not self._state[name].live:
            entry = await _quiet_last(store, self.family, self.cas_timeout)
            rec = parse_session(entry.value) if entry and entry.key == self.key else None
            ours = rec is not None and rec.epoch in self._own_epochs
            if entry is not None and rec is not None and ours and rec.state is SessionState.ALIVE:
                self._set(name, epoch=rec.epoch, seq=entry.seq, live=True)
        for _ in range(3):
            s = self._state[name]
            if not s.live:
                return
            self._set(name, fresh_until=NEG_INF)
            try:
                seq = await store.cas(
                    self.key,
                    self._record(name, s.epoch, SessionState.CLOSED, self.clock()),
                    self.family,
                    s.seq,
                    self.cas_timeout,
                )
            except StoreError as exc:
                if exc.conflict:
                    entry = await _quiet_last(store, self.family, self.cas_timeout)
                    rec = parse_session(entry.value) if entry and entry.key == self.key else None
                    if entry is not None and rec is not None and rec.epoch == s.epoch:
                        self._set(name, seq=entry.seq)
                        continue
                    self._set(name, live=False)
                    return
                continue
            self._set(name, seq=seq, live=False)
            return

    # --- all stores -------------------------------------------------------------------------

    async def run_store(self, name: str, watchdog: Callable[[], bool]) -> None:
        """Renew one store every ttl/3 for ever; retry soon after an error."""
        while not self._closed:
            started = self.clock()
            pause = self.interval
            if watchdog():
                before = self._state[name]
                ok = await self.renew(name)
                if not ok:
                    pause = 0.25
                if self._state[name] != before:
                    self._changed()
            await asyncio.sleep(max(0.0, pause - (self.clock() - started)))

    async def close(self) -> None:
        """Stop believing first, then write ``closed`` in every store."""
        self._closed = True
        self._changed()
        await asyncio.gather(*(self.close_store(n) for n in self.stores), return_exceptions=True)
        self._changed()


async def _quiet_last(store: Store, family: str, timeout: float) -> Entry | None:
    with contextlib.suppress(StoreError):
        return await store.last(family, timeout)
    return None


Connect = Callable[[], Awaitable[Client]]


@dataclass
class _Watchdog:
    stall_limit: float
    clock: Clock
    stamp: float = field(default_factory=boottime)
    stalled: bool = False
    suspended: bool = False

    def ok(self) -> bool:
        if self.suspended:
            return False
        stalled = self.clock() - self.stamp > self.stall_limit
        if stalled and not self.stalled:
            log.error(
                "main_loop_stalled",
                msg=f"the agent's main loop made no progress for {self.stall_limit:g}s: "
                "no more renewals, leases will lapse",
                stall_limit=self.stall_limit,
            )
        elif self.stalled and not stalled:
            log.info("main_loop_back", msg="the agent's main loop is back: renewing again")
        self.stalled = stalled
        return not stalled


class SessionThread:
    """``SessionCore`` on a dedicated thread with its own loop and NATS connection.

    Thread-safe API: ``view()``, ``stamp()``, ``anchor()``, ``subscribe()``; ``start()`` and
    ``close()`` are awaited from the main loop.
    """

    def __init__(
        self,
        connect: Connect,
        stores: list[str],
        site: str,
        node: str,
        *,
        ttl: float,
        margin: float,
        stall_limit: float | None = None,
        clock: Clock = boottime,
        on_renewed: Callable[[SessionView], None] | None = None,
    ) -> None:
        self._connect = connect
        self._args = (stores, site, node)
        self.ttl = ttl
        self.margin = margin
        self.clock = clock
        self.watchdog = _Watchdog(float("inf") if stall_limit is None else stall_limit, clock)
        self._core: SessionCore | None = None
        self._view = SessionView(
            f"{site}/{node}", ttl, margin, {s: StoreSession(s) for s in stores}
        )
        self._subscribers: list[Callable[[SessionView], None]] = []
        if on_renewed is not None:
            self._subscribers.append(on_renewed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready: Future[None] = Future()
        self._done: asyncio.Future[None] | None = None
        self._lock = threading.Lock()
        self._write_close = True

    @property
    def agent(self) -> str:
        return self._view.agent

    def view(self) -> SessionView:
        return self._view

    async def join(self) -> None:
        """Wait until the thread ends."""
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def alive(self) -> bool:
        """The thread runs (False once it ended, by ``close`` or by a crash)."""
        return self._thread is not None and self._thread.is_alive()

    def stamp(self) -> None:
        """The main loop is alive (called every control cycle)."""
        self.watchdog.stamp = self.clock()

    def suspend(self, suspended: bool = True) -> None:
        """Stop (or resume) renewing, as a hung agent would: validity runs out on its own."""
        self.watchdog.suspended = suspended

    def subscribe(self, cb: Callable[[SessionView], None]) -> None:
        """``cb(view)`` runs on the session thread after every change: keep it tiny and
        thread-safe (``loop.call_soon_threadsafe``, an ``os.write``)."""
        with self._lock:
            self._subscribers.append(cb)

    def anchor(self, store: str, epoch: str) -> None:
        core, loop = self._core, self._loop
        if core is not None and loop is not None:
            loop.call_soon_threadsafe(core.anchor, store, epoch)

    def _publish(self, view: SessionView) -> None:
        self._view = view
        with self._lock:
            subscribers = list(self._subscribers)
        for cb in subscribers:
            try:
                cb(view)
            except Exception as exc:
                log.error(
                    "session_subscriber_failed",
                    msg=f"session subscriber failed: {exc!r}",
                    error=repr(exc),
                )

    async def start(self) -> None:
        """Start the thread; returns once its connection is up and the first open ran."""
        self._thread = threading.Thread(target=self._main, name="session", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(self._ready)

    def _main(self) -> None:
        try:
            import uvloop

            uvloop.run(self._run())
        except BaseException as exc:  # reported through the ready/done futures
            if not self._ready.done():
                self._ready.set_exception(exc)
            log.error("session_thread_ended", msg=f"session thread ended: {exc!r}", error=repr(exc))

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        nc = await self._connect()
        stores, site, node = self._args
        core = SessionCore(
            nc, stores, site, node, ttl=self.ttl, margin=self.margin, clock=self.clock
        )
        core.on_change.append(self._publish)
        self._core = core
        await asyncio.gather(*(core.open(s) for s in stores))
        self._publish(core.view())
        self._ready.set_result(None)
        tasks = [
            asyncio.create_task(core.run_store(s, self.watchdog.ok), name=f"renew:{s}")
            for s in stores
        ]
        ticker = asyncio.create_task(self._tick(core), name="session-deadline")
        try:
            await self._done
        finally:
            for task in [*tasks, ticker]:
                task.cancel()
            await asyncio.gather(*tasks, ticker, return_exceptions=True)
            if self._write_close:
                await core.close()
            self._publish(core.view())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)

    async def _tick(self, core: SessionCore) -> None:
        """Publish a view when the deadline passes, even if every store is silent."""
        was_valid = False
        while True:
            valid = core.view().valid(self.clock())
            if was_valid and not valid:
                log.warning(
                    "session_lapsed",
                    msg="session validity ran out without a quorum of renewals",
                    deadline=wall_iso(core.view().deadline(), self.clock),
                )
                self._publish(core.view())
            was_valid = valid
            await asyncio.sleep(0.1)

    async def close(self, timeout: float = 5.0, *, write: bool = True) -> None:
        """Write ``closed`` in every store and stop the thread (``write=False``: stop
        without a word, as a crash would; others then expire the session)."""
        self._write_close = write
        loop, done = self._loop, self._done
        if loop is None or done is None or self._thread is None:
            return

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        loop.call_soon_threadsafe(finish)
        await asyncio.to_thread(self._thread.join, timeout)
