"""Leases on JetStream KV, bound to the holder's session, with fencing tokens.

``LeaseManager`` is the NATS side of ``mesh.election``: one KV watch on ``harmony-leases``
and one on the ``agent.>`` session keys of ``harmony-state`` feed a cache; a single loop
runs ``decide`` for each wanted lease whose inputs changed (or whose timer is due) and
executes the decision. Every write it makes is a compare-and-set:

* acquire: ``kv.create(key)`` when the key never existed, else ``kv.update(key, last=rev)``
  over the exact revision that was judged free. The revision returned is the **fencing
  token**: lease keys are written only on acquisition and release, never on renewal, so
  the key's revision is the token for any reader, and it strictly increases per key.
* take over: ``session.expire`` = ``kv.update(session_key, last=rev)`` over the holder's
  session revision we watched stay unchanged for a full ttl; then acquire as above.
* release: ``kv.delete(key, last=token)``; handover: ``kv.update(key, marker, last=token)``.

Renewal costs nothing per lease: only the session is renewed (three writes per ttl per
agent). A lease is held while the session epoch that took it is valid; the session's own
deadline timer ends every lease at ``valid_until`` even when the mesh is silent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mesh import metrics
from mesh.election import (
    HANDOVER,
    HELD,
    Action,
    Decision,
    LeaseObs,
    LeaseValue,
    Me,
    SessionObs,
    decide,
)
from mesh.names import LEASES_BUCKET, STATE_BUCKET
from mesh.session import (
    RenewResult,
    Session,
    decode,
    expire,
    now_rfc3339,
    raise_if_cancelling,
)
from mesh.watch import Change, KvWatch

log = structlog.get_logger("mesh.leases")

StopHook = Callable[[], Awaitable[None]]
AcquiredCallback = Callable[[str, int, float], None]
LostCallback = Callable[[str, int, str], None]
DeadlineCallback = Callable[[float], None]


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel until done: on Python 3.11 ``asyncio.wait_for`` can swallow a cancellation
    that races with its inner future completing, so one ``cancel()`` is not enough."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieve it so it is not reported as never retrieved


@dataclass(frozen=True)
class Tenure:
    """One holding of one lease by this manager, as it believed it (monotonic times)."""

    name: str
    key: str
    token: int
    start: float
    """When the acquiring write was acknowledged (or adopted)."""
    end: float
    """When we stopped believing: min(loss noticed, session validity at that moment)."""
    why: str


@dataclass(frozen=True)
class LeaseStatus:
    """One wanted lease as this manager sees it now (for status and tests)."""

    name: str
    key: str
    rank: int
    held: bool
    token: int | None
    """Our token if held, else the key's revision as last watched."""
    holder: str | None
    deadline: float | None
    decision: str


@dataclass
class _Want:
    name: str
    key: str
    rank: int
    since: float
    """When we started wanting it: a key that was already free counts as freed then, so a
    new lease (every agent starts wanting it at once) also goes by rank."""


@dataclass
class _Held:
    key: str
    token: int
    start: float


class LeaseManager:
    """Acquire, hold, release and hand over leases for one agent.

    Usage (the controller)::

        mgr = LeaseManager(js, session)           # session: a running mesh.session.Session
        mgr.on_acquired.append(start_workload)    # (name, token, deadline)
        mgr.on_lost.append(stop_workload)         # (name, token, why): stop NOW
        mgr.on_deadline.append(feed_guards)       # (deadline) after each renewal
        await mgr.start()
        mgr.want("ledger", app_key("ledger"), rank=0)
        ...
        await mgr.release("ledger", stop=stop_workload_and_wait)   # or handover(..., to=)

    Callbacks run synchronously on the event loop and must not block. ``deadline`` is the
    session's monotonic ``valid_until`` (same clock as ``time.monotonic`` unless the
    session was built with another): a guard must kill the workload at that instant unless
    a later deadline arrived. ``on_lost`` fires at the latest at the deadline, by timer.
    """

    def __init__(
        self,
        js: JetStreamContext,
        session: Session,
        *,
        leases_bucket: str = LEASES_BUCKET,
        state_bucket: str = STATE_BUCKET,
        site: str | None = None,
        step: float = 0.1,
        handover_window: float | None = None,
        cas_timeout: float = 2.0,
        watch_heartbeat: float = 1.0,
        max_in_flight: int = 64,
        history: int = 10_000,
    ) -> None:
        self.js = js
        self.session = session
        self.agent = session.agent_id
        self.site = site or self.agent.split("/", 1)[0]
        self.step = step
        """Preference step: a contender of rank r waits r * step after a lease frees."""
        self.handover_window = session.ttl if handover_window is None else handover_window
        self.cas_timeout = cas_timeout
        self._bucket = leases_bucket
        self._state_bucket = state_bucket
        self._heartbeat = watch_heartbeat
        self._clock = session.clock
        self._kv: KeyValue | None = None
        self._wants: dict[str, _Want] = {}
        self._by_key: dict[str, str] = {}
        self._held: dict[str, _Held] = {}
        self._leases: dict[str, LeaseObs] = {}
        self._raw: dict[str, tuple[int, bytes | None, float]] = {}
        """Lease keys nobody here wants: revision, raw value, first seen (parsed lazily)."""
        self._sessions: dict[str, SessionObs] = {}
        self._naming: dict[str, set[str]] = {}
        """Session key -> lease keys whose value names it (to wake the right leases)."""
        self._dirty: set[str] = set()
        self._timers: dict[str, float] = {}
        self._in_flight: set[str] = set()
        self._releasing: set[str] = set()
        self._expiring: set[tuple[str, int]] = set()
        self._decisions: dict[str, str] = {}
        self._dropped: dict[str, int] = {}
        """Lease key -> highest token we stopped holding (never adopted again)."""
        self._deadline = float("-inf")
        self._ready_at: float | None = None
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._watches: list[KvWatch] = []
        self.tenures: deque[Tenure] = deque(maxlen=history)
        self.on_acquired: list[AcquiredCallback] = []
        self.on_lost: list[LostCallback] = []
        self.on_deadline: list[DeadlineCallback] = []
        session.on_lost.append(self._session_lost)
        session.on_new_epoch.append(self._session_new)
        session.on_renew.append(self._session_renewed)

    # --- public API -----------------------------------------------------------------------

    async def start(self, timeout: float = 10.0, *, max_backoff: float = 2.0) -> None:
        """Bind the bucket, start both watches, wait for their first snapshot, then run.

        A JetStream outage (a stream leader election stalls the API for 4-9 s) is waited
        out: each attempt gets ``timeout`` seconds, then we retry with backoff for ever.
        Cancel to give up. Nothing can be held before this returns.
        """
        backoff = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._start_watches(timeout)
                break
            except (TimeoutError, NatsError, OSError) as exc:
                for watch in self._watches:
                    await watch.stop()
                self._watches = []
                self._leases.clear()
                self._raw.clear()
                self._sessions.clear()
                self._naming.clear()
                log.warning("lease watches not ready; retrying", error=repr(exc), attempt=attempt)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
        self._ready_at = self._clock()
        self._dirty.update(self._wants)
        self._loop_task = asyncio.create_task(self._run(), name=f"leases-{self.agent}")

    async def _start_watches(self, timeout: float) -> None:
        self._kv = await asyncio.wait_for(self.js.key_value(self._bucket), timeout)
        self._watches = [
            KvWatch(self.js, self._bucket, ">", self._on_lease, heartbeat=self._heartbeat),
            KvWatch(
                self.js, self._state_bucket, "agent.>", self._on_session, heartbeat=self._heartbeat
            ),
        ]
        for watch in self._watches:
            await asyncio.wait_for(watch.start(), timeout)
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in self._watches)), timeout)

    async def stop(self) -> None:
        """Stop watching and deciding; leases still held are reported lost (no write)."""
        if self._loop_task is not None:
            await cancel_and_wait(self._loop_task)
            self._loop_task = None
        for task in list(self._tasks):
            await cancel_and_wait(task)
        for watch in self._watches:
            await watch.stop()
        for name in list(self._held):
            self._drop(name, "lease manager stopped", "stopped")

    def want(self, name: str, key: str, *, rank: int = 0) -> None:
        """Contend for lease ``key`` under ``name`` with preference ``rank`` (0 = best).

        Idempotent; changing the rank of a held lease changes nothing until it frees.
        Acquisition happens in the background and is announced by ``on_acquired``.
        """
        old = self._wants.get(name)
        if old is not None and old.key != key:
            raise ValueError(f"lease {name} is already wanted under key {old.key}")
        since = old.since if old is not None else self.session.clock()
        self._wants[name] = _Want(name, key, rank, since)
        self._by_key[key] = name
        raw = self._raw.get(key)
        if raw is not None:
            self._record(key, *raw)
        self._touch(name)

    async def release(
        self, name: str, *, to: str | None = None, stop: StopHook | None = None
    ) -> bool:
        """Stop wanting ``name``; if held: await ``stop()``, stop believing, then CAS.

        The write is ``kv.delete(key, last=token)``, or with ``to`` (an agent id
        ``site/node`` or a site) a handover marker by ``kv.update(key, last=token)``
        that only ``to`` may take at once (others after ``handover_window``). A waiting
        contender sees either through its watch and acquires without any expiry wait.
        True if our write landed; False if we did not hold it or the CAS failed (then the
        lease was not ours any more, or is freed with our session).
        """
        want = self._wants.pop(name, None)
        if want is not None:
            self._by_key.pop(want.key, None)
            self._timers.pop(name, None)
        held = self._held.get(name)
        if held is None:
            return False
        self._releasing.add(held.key)
        try:
            if stop is not None:
                await stop()
            if self._held.get(name) is not held:
                return False  # lost while stopping: nothing of ours to release any more
            s = self.session
            self._drop(name, "released" if to is None else f"handed over to {to}", "released")
            kv = self._require_kv()
            if to is None:
                await asyncio.wait_for(kv.delete(held.key, last=held.token), self.cas_timeout)
            else:
                marker = LeaseValue(
                    holder=self.agent,
                    session=s.key,
                    epoch=s.epoch,
                    session_rev=s.revision or 0,
                    ttl=s.ttl,
                    acquired_at=now_rfc3339(),
                    state=HANDOVER,
                    handover_to=to,
                )
                await asyncio.wait_for(
                    kv.update(held.key, marker.encode(), last=held.token), self.cas_timeout
                )
        except APIError as exc:
            # 10071: wrong last sequence: the key moved on (our session was expired and
            # the lease taken): there is nothing of ours left to release.
            log.info("lease release refused", lease=name, error=repr(exc), code=exc.err_code)
            return False
        except (TimeoutError, NatsError, OSError) as exc:
            # Ambiguous: retry the CAS in the background (it fails harmlessly if it landed).
            log.warning("lease release write failed; retrying", lease=name, error=repr(exc))
            self._spawn(f"release:{held.key}", self._delete_orphan(held.key, held.token, 0.2))
            return False
        finally:
            self._releasing.discard(held.key)
        log.info("lease released", lease=name, token=held.token, to=to)
        return True

    async def handover(self, name: str, to: str, *, stop: StopHook | None = None) -> bool:
        """``release(name, to=to, stop=stop)``: planned move to one agent or site."""
        return await self.release(name, to=to, stop=stop)

    def held(self) -> dict[str, int]:
        """Leases held now: name -> fencing token."""
        return {name: h.token for name, h in self._held.items() if self.session.valid()}

    def open_tenures(self) -> list[Tenure]:
        """Leases held now as tenures that end at the current deadline (if not renewed)."""
        end = self.session.valid_until
        return [
            Tenure(name, h.key, h.token, h.start, max(h.start, end), "held")
            for name, h in self._held.items()
        ]

    def deadline(self) -> float:
        """Monotonic instant at which every lease held now ends unless the session renews."""
        return self.session.valid_until

    def observe(self) -> dict[str, LeaseStatus]:
        """Every wanted lease with who holds it and the last decision's sentence."""
        out: dict[str, LeaseStatus] = {}
        for name, want in self._wants.items():
            obs = self._leases.get(want.key)
            mine = self._held.get(name)
            value = obs.value if obs is not None else None
            out[name] = LeaseStatus(
                name=name,
                key=want.key,
                rank=want.rank,
                held=mine is not None,
                token=mine.token if mine else (obs.revision if obs else None),
                holder=value.holder if value is not None and value.state == HELD else None,
                deadline=self.session.valid_until if mine else None,
                decision=self._decisions.get(name, "not decided yet"),
            )
        return out

    # --- watch callbacks ------------------------------------------------------------------

    def _on_lease(self, change: Change) -> None:
        prev = self._leases.get(change.key)
        if prev is not None and prev.revision is not None and change.revision <= prev.revision:
            return  # redelivered after the ordered consumer was recreated
        raw = self._raw.get(change.key)
        if raw is not None and change.revision <= raw[0]:
            return
        name = self._by_key.get(change.key)
        epoch = self.session.epoch.encode()
        if name is None and not (change.value and epoch and epoch in change.value):
            # Not ours to decide about: keep it unparsed (parsed by want() if it becomes
            # so). With 1,000 leases, most of the watch is other agents' business.
            self._forget(change.key)
            self._raw[change.key] = (change.revision, change.value, self._clock())
            return
        self._record(change.key, change.revision, change.value, self._clock())
        value = self._leases[change.key].value
        if name is not None:
            self._touch(name)
        elif value is not None and self._is_orphan(change.key, value):
            self._spawn(f"orphan:{change.key}", self._delete_orphan(change.key, change.revision))

    def _forget(self, key: str) -> None:
        prev = self._leases.pop(key, None)
        if prev is not None and prev.value is not None:
            self._naming.get(prev.value.session, set()).discard(key)

    def _record(self, key: str, revision: int, raw: bytes | None, since: float) -> None:
        self._forget(key)
        self._raw.pop(key, None)
        value = LeaseValue.parse(raw)
        if value is not None:
            self._naming.setdefault(value.session, set()).add(key)
        self._leases[key] = LeaseObs(revision, value, since, raw is None or value is not None)

    def _on_session(self, change: Change) -> None:
        prev = self._sessions.get(change.key)
        if prev is not None and change.revision <= prev.revision:
            return
        view = decode(change.value, change.revision)
        self._sessions[change.key] = SessionObs(change.revision, view, self._clock())
        for key in self._naming.get(change.key, ()):
            name = self._by_key.get(key)
            if name is not None:
                self._touch(name)

    def _is_orphan(self, key: str, value: LeaseValue) -> bool:
        """Ours (current epoch), held, but neither wanted nor held: a release that failed."""
        return (
            value.state == HELD
            and value.session == self.session.key
            and value.epoch == self.session.epoch
            and key not in self._releasing
            and all(h.key != key for h in self._held.values())
        )

    # --- session callbacks ----------------------------------------------------------------

    def _session_lost(self, epoch: str) -> None:
        for name in list(self._held):
            self._drop(name, f"session epoch {epoch} ended", "session")

    def _session_new(self, epoch: str) -> None:
        self._deadline = self.session.valid_until
        for name in self._wants:
            self._touch(name)

    def _session_renewed(self, result: RenewResult, latency: float) -> None:
        if result is not RenewResult.OK:
            return
        metrics.RENEW_SECONDS.observe(latency)
        self._deadline = self.session.valid_until
        if self._held:
            for cb in self.on_deadline:
                cb(self._deadline)

    # --- the decision loop ----------------------------------------------------------------

    def _touch(self, name: str) -> None:
        self._dirty.add(name)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            raise_if_cancelling()
            self._wake.clear()
            nxt = self._evaluate()
            if nxt is None:
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, nxt - self._clock()))

    def _evaluate(self) -> float | None:
        """Decide for every dirty or due lease; return when to look again (None: on change)."""
        now = self._clock()
        for name, at in list(self._timers.items()):
            if at <= now:
                del self._timers[name]
                self._dirty.add(name)
        dirty, self._dirty = self._dirty, set()
        for name in dirty:
            want = self._wants.get(name)
            if want is not None and name not in self._in_flight:
                self._step(want, now)
        return min(self._timers.values(), default=None)

    def _me(self, now: float) -> Me:
        s = self.session
        return Me(
            agent=self.agent,
            site=self.site,
            session_key=s.key,
            epoch=s.epoch,
            valid=s.valid(now),
            ttl=s.ttl,
        )

    def _step(self, want: _Want, now: float) -> None:
        assert self._ready_at is not None
        lease = self._leases.get(want.key) or LeaseObs(None, None, self._ready_at)
        if lease.value is None and lease.since < want.since:
            lease = replace(lease, since=want.since)
        holder = self._sessions.get(lease.value.session) if lease.value is not None else None
        held = self._held.get(want.name)
        d = decide(
            lease=lease,
            holder=holder,
            me=self._me(now),
            now=now,
            held_token=held.token if held is not None else None,
            rank=want.rank,
            step=self.step,
            handover_window=self.handover_window,
            dropped=self._dropped.get(want.key, 0),
        )
        self._note(want.name, d)
        if d.action is Action.HOLD and held is None and d.token is not None:
            self._gain(want, d.token, now)
        elif d.action is Action.LOST:
            why = d.why
            self._drop(want.name, why, "session" if "session" in why else "rewritten")
        elif d.action is Action.ACQUIRE:
            self._in_flight.add(want.name)
            self._spawn(want.name, self._acquire(want, d.last))
        elif d.action is Action.EXPIRE and d.session is not None and lease.value is not None:
            token = (lease.value.session, d.session.revision)
            if token not in self._expiring:
                self._expiring.add(token)
                self._spawn(f"expire:{token}", self._expire(lease.value.session, d))
        elif d.action is Action.WAIT and d.retry_at is not None:
            self._timers[want.name] = d.retry_at

    def _note(self, name: str, d: Decision) -> None:
        if self._decisions.get(name) != d.why:
            self._decisions[name] = d.why
            log.debug("lease decision", lease=name, action=str(d.action), why=d.why)

    def _gain(self, want: _Want, token: int, acked: float) -> None:
        self._held[want.name] = _Held(want.key, token, acked)
        self._deadline = self.session.valid_until
        metrics.ACQUISITIONS.inc()
        metrics.LEASES_HELD.inc()
        log.info("lease acquired", lease=want.name, token=token, deadline=self._deadline)
        for cb in self.on_acquired:
            cb(want.name, token, self._deadline)

    def _drop(self, name: str, why: str, reason: str) -> None:
        held = self._held.pop(name, None)
        if held is None:
            return
        self._dropped[held.key] = max(held.token, self._dropped.get(held.key, 0))
        now = self._clock()
        end = min(now, self._deadline)
        self.tenures.append(Tenure(name, held.key, held.token, held.start, end, why))
        metrics.LEASES_HELD.dec()
        metrics.LOSSES.labels(reason).inc()
        log.info("lease lost", lease=name, token=held.token, why=why)
        for cb in self.on_lost:
            cb(name, held.token, why)
        if name in self._wants:
            self._touch(name)

    # --- writes (all compare-and-set) -----------------------------------------------------

    def _require_kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("LeaseManager.start() was not awaited")
        return self._kv

    def _spawn(self, label: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"lease-{label}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retry(self, name: str, delay: float = 0.2) -> None:
        self._timers[name] = min(self._timers.get(name, float("inf")), self._clock() + delay)
        self._wake.set()

    async def _acquire(self, want: _Want, last: int | None) -> None:
        s = self.session
        try:
            async with self._limit:
                if not s.valid() or s.revision is None:
                    return
                epoch = s.epoch
                value = LeaseValue(
                    holder=self.agent,
                    session=s.key,
                    epoch=epoch,
                    session_rev=s.revision,
                    ttl=s.ttl,
                    acquired_at=now_rfc3339(),
                ).encode()
                kv = self._require_kv()
                try:
                    if last is None:
                        rev = await asyncio.wait_for(kv.create(want.key, value), self.cas_timeout)
                    else:
                        rev = await asyncio.wait_for(
                            kv.update(want.key, value, last=last), self.cas_timeout
                        )
                except KeyWrongLastSequenceError:
                    log.debug("lease race lost", lease=want.name, last=last)
                    self._retry(want.name)
                    return
                except (TimeoutError, NatsError, OSError) as exc:
                    # Ambiguous: it may still land; then the watch shows it and we adopt it.
                    log.debug("lease acquire failed", lease=want.name, error=repr(exc))
                    self._retry(want.name)
                    return
            acked = self._clock()
            valid = s.epoch == epoch and s.valid(acked)
            if valid and self._wants.get(want.name) is want:
                self._gain(want, rev, acked)
            elif valid:
                await self._delete_orphan(want.key, rev)  # released while in flight
        finally:
            self._in_flight.discard(want.name)
            self._touch(want.name)

    async def _expire(self, session_key: str, d: Decision) -> None:
        assert d.session is not None
        ok = await expire(
            self.session.kv, session_key, d.session, by=self.agent, timeout=self.cas_timeout
        )
        if ok:
            metrics.SESSION_EXPIRIES.inc()
            log.info("session expired", session=session_key, why=d.why)
        else:
            self._expiring.discard((session_key, d.session.revision))

    async def _delete_orphan(self, key: str, revision: int, delay: float = 0.0) -> None:
        """Delete a lease value of ours nobody wants, by CAS on its revision."""
        await asyncio.sleep(delay)
        with contextlib.suppress(TimeoutError, NatsError, OSError):
            await asyncio.wait_for(self._require_kv().delete(key, last=revision), self.cas_timeout)
            log.info("orphaned lease released", key=key, token=revision)
