"""Agent sessions: one key per agent, renewed by compare-and-set, that all its leases hang on.

Why a session: renewing 1,000 leases one by one costs 1,000 writes per ttl. Like Consul, we
bind leases to a per-agent session and renew only the session, so the write rate is three
per ttl per agent whatever the lease count. The session key is the agent's heartbeat key
``agent.<site>.<node>`` in ``harmony-state``: one write both says "alive" and renews.

Safety rules (DESIGN-NOTES, "Only a successful CAS write proves you hold a lease"):

* Every renewal is ``update(key, last=revision)``. It succeeds only if nobody else wrote the
  key since our last renewal, so the holder learns it lost the session the moment it tries.
* The holder's session is valid until *the monotonic time at which it sent* its last
  successful renewal + ttl - margin. A renewal that fails, times out, or is never answered
  extends nothing, and the session lapses on time even if the mesh is unreachable.
* A contender that wants the session's leases first *expires* the session with its own CAS
  (see ``expire``), after watching it unchanged for a full ttl. Once that write lands the
  holder's next renewal fails, so holder and contender can never both believe.
* A lapsed session is never resurrected: the holder opens a new epoch and must win each
  lease again by CAS.
* The holder stops believing at ``valid_until`` by a timer, even if the mesh is silent: it
  does not wait for its next renewal attempt to fail.
* ``open`` never overwrites a *live foreign* epoch at once. The agent id may be running
  twice (a duplicate agent) or the previous process may have died a moment ago after a
  renewal: replacing its epoch immediately would free its leases while it (or its
  workload, until its deadline) still believes it holds them. So ``open`` waits until it
  has watched that epoch stay unchanged for a full ttl, exactly as a contender would.
  Closed or expired values, and epochs this process itself abandoned, are replaced at once.
* A renewal that timed out may still land later. A CAS failure is therefore checked: if
  the key holds our epoch with a renewal we sent, we adopt it with the validity of *that*
  send (safe: a contender only overwrites a revision after watching it for a full ttl).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = structlog.get_logger("mesh.session")

Clock = Callable[[], float]


def raise_if_cancelling() -> None:
    """Honour a cancellation that ``asyncio.wait_for`` swallowed (Python 3.11 race: the
    inner future completed as the cancel arrived); long loops call this every cycle."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RenewResult(StrEnum):
    OK = "ok"
    """Written: the session is valid until sent + ttl - margin."""
    LOST = "lost"
    """Someone else wrote our key (a contender expired us): the epoch is over."""
    ERROR = "error"
    """No answer or a mesh error: validity is unchanged and runs out on its own."""


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SessionView:
    """What a reader can tell from a session key's value."""

    agent: str
    epoch: str
    state: str
    ttl: float
    revision: int
    data: dict[str, Any]

    @property
    def alive(self) -> bool:
        return self.state == "alive"


def decode(value: bytes | None, revision: int) -> SessionView | None:
    """Parse a session value; None for anything that is not one (never raises)."""
    if not value:
        return None
    try:
        data = json.loads(value)
        return SessionView(
            agent=str(data["agent"]),
            epoch=str(data["epoch"]),
            state=str(data.get("state", "alive")),
            ttl=float(data["ttl"]),
            revision=revision,
            data=data,
        )
    except (ValueError, KeyError, TypeError):
        return None


class Session:
    """The holder's side of a session. Not thread-safe; one renewal in flight at a time."""

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        agent_id: str,
        *,
        ttl: float,
        margin: float,
        payload: Callable[[], dict[str, Any]] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0 <= margin < ttl:
            raise ValueError("margin must be in [0, ttl)")
        self.kv = kv
        self.key = key
        self.agent_id = agent_id
        self.ttl = ttl
        self.margin = margin
        self._payload = payload or dict
        self._clock = clock
        self.epoch = ""
        self.revision: int | None = None
        self.valid_until = float("-inf")
        self.last_write_sent: float | None = None
        """Monotonic send time of the last successful write: the quorum evidence."""
        self.last_latency: float | None = None
        self.seq = 0
        self._sent: dict[int, float] = {}
        """seq -> monotonic send time of our recent writes (to adopt a late-landing one)."""
        self._own_epochs: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.on_renew: list[Callable[[RenewResult, float], None]] = []
        self.on_new_epoch: list[Callable[[str], None]] = []
        self.on_lost: list[Callable[[str], None]] = []

    @property
    def clock(self) -> Clock:
        """The monotonic clock every deadline of this session is measured on."""
        return self._clock

    @property
    def interval(self) -> float:
        return self.ttl / 3

    def valid(self, now: float | None = None) -> bool:
        return (self._clock() if now is None else now) < self.valid_until

    def remaining(self) -> float:
        return max(0.0, self.valid_until - self._clock())

    def in_quorum(self, now: float | None = None) -> bool:
        """A mesh write succeeded within the last ttl (measured from when it was sent)."""
        now = self._clock() if now is None else now
        return self.last_write_sent is not None and now - self.last_write_sent < self.ttl

    def _value(self, state: str = "alive", sent: float | None = None) -> bytes:
        self.seq += 1
        self._sent[self.seq] = self._clock() if sent is None else sent
        for old in [k for k in self._sent if k <= self.seq - 8]:
            del self._sent[old]
        body = {
            **self._payload(),
            "agent": self.agent_id,
            "epoch": self.epoch,
            "state": state,
            "ttl": self.ttl,
            "seq": self.seq,
            "time": now_rfc3339(),
        }
        return json.dumps(body, separators=(",", ":")).encode()

    def _accepted(self, sent: float, revision: int) -> None:
        acked = self._clock()
        self.revision = revision
        self.last_write_sent = sent
        self.last_latency = acked - sent
        self.valid_until = max(self.valid_until, sent + self.ttl - self.margin)
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Fire ``check_deadline`` at ``valid_until``, whatever the mesh does meanwhile."""
        if self._timer is not None:
            self._timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(max(0.0, self.remaining()), self.check_deadline)

    def check_deadline(self) -> None:
        """End the epoch if its validity ran out without a successful renewal."""
        self._timer = None
        if self.revision is not None and not self.valid():
            self._lose("validity ran out without a successful renewal")
        elif self.revision is not None:
            self._arm_timer()  # renewed meanwhile (timer not yet re-armed) or clock early

    async def _current(self, timeout: float) -> SessionView | int:
        """The key's current value as a view; else the revision to CAS over (0: absent)."""
        try:
            entry = await asyncio.wait_for(self.kv.get(self.key), timeout)
        except KeyNotFoundError as exc:
            # A deleted key still has a revision to CAS against (the delete marker).
            marker = getattr(exc, "entry", None)
            return int(marker.revision) if marker is not None and marker.revision else 0
        view = decode(entry.value, entry.revision or 0)
        return view if view is not None else int(entry.revision or 0)

    async def _wait_unchanged(self, view: SessionView) -> bool:
        """Watch a live foreign epoch; True once it stayed at one revision for a full ttl.

        False if it changed meanwhile (the caller reads again) or the watch failed.
        """
        ttl = max(view.ttl, self.ttl)
        log.warning(
            "agent id already has a live session: duplicate agent, or a restart right after "
            "a crash; waiting for it to stay unchanged for a full ttl",
            key=self.key,
            epoch=view.epoch,
            ttl=ttl,
        )
        deadline = self._clock() + ttl
        try:
            watcher = await self.kv.watch(self.key)
        except (TimeoutError, NatsError, OSError):
            return False
        try:
            while (left := deadline - self._clock()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)  # type: ignore[no-untyped-call]
                except (TimeoutError, NatsError):
                    continue
                if entry is not None and (entry.revision or 0) > view.revision:
                    return False
            return True
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def open(self, timeout: float | None = None) -> bool:
        """Start a new epoch by CAS over whatever the key holds. False on mesh error.

        A live epoch that is not one of ours is first watched for a full ttl (see the
        module docstring); ``open`` may therefore take up to ttl after a crash-restart.
        """
        timeout = timeout or self.interval
        self._cancel_timer()
        self.epoch = uuid.uuid4().hex[:16]
        self._own_epochs.add(self.epoch)
        self.revision = None
        self.valid_until = float("-inf")
        for _ in range(5):
            try:
                current = await self._current(timeout)
                if isinstance(current, SessionView):
                    foreign = current.alive and current.epoch not in self._own_epochs
                    if foreign and not await self._wait_unchanged(current):
                        continue
                    last = current.revision
                else:
                    last = current
                sent = self._clock()
                value = self._value(sent=sent)
                if last == 0:
                    rev = await asyncio.wait_for(self.kv.create(self.key, value), timeout)
                else:
                    rev = await asyncio.wait_for(
                        self.kv.update(self.key, value, last=last), timeout
                    )
            except KeyWrongLastSequenceError:
                continue  # raced with another writer (a contender expiring us): read again
            except (TimeoutError, NatsError, OSError) as exc:
                log.debug("session open failed", key=self.key, error=repr(exc))
                return False
            self._accepted(sent, rev)
            log.info("session opened", key=self.key, epoch=self.epoch, revision=rev)
            for cb in self.on_new_epoch:
                cb(self.epoch)
            return True
        return False

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _landed_late(self, timeout: float) -> int | None:
        """After a CAS failure: the revision of our own renewal if one landed unanswered."""
        try:
            current = await self._current(timeout)
        except (TimeoutError, NatsError, OSError):
            return None
        if not isinstance(current, SessionView):
            return None
        seq = current.data.get("seq")
        if (
            current.agent == self.agent_id
            and current.epoch == self.epoch
            and current.alive
            and isinstance(seq, int)
            and seq in self._sent
            and self.revision is not None
            and current.revision > self.revision
        ):
            self._accepted(self._sent[seq], current.revision)
            return current.revision
        return None

    async def renew(self) -> RenewResult:
        if self.revision is None:
            return RenewResult.LOST
        epoch, last = self.epoch, self.revision
        sent = self._clock()
        timeout = max(
            0.05, min(self.interval, self.valid_until - sent) if self.valid(sent) else self.interval
        )
        try:
            rev = await asyncio.wait_for(
                self.kv.update(self.key, self._value(sent=sent), last=last), timeout
            )
        except KeyWrongLastSequenceError:
            result = RenewResult.LOST
            if self.epoch == epoch and await self._landed_late(timeout) is not None:
                result = RenewResult.OK
        except (TimeoutError, NatsError, OSError) as exc:
            log.debug("session renewal failed", key=self.key, error=repr(exc))
            result = RenewResult.ERROR
        else:
            result = RenewResult.OK
            if self.epoch == epoch and self.revision == last:
                self._accepted(sent, rev)
        if self.epoch != epoch or self.revision is None:
            # The epoch ended while we waited (deadline timer, close): the answer is moot.
            result = RenewResult.LOST if result is RenewResult.LOST else RenewResult.ERROR
        elif result is RenewResult.LOST:
            self._lose("expired by another agent")
        for cb in self.on_renew:
            cb(result, self._clock() - sent)
        return result

    def _lose(self, why: str) -> None:
        self._cancel_timer()
        epoch, self.revision, self.valid_until = self.epoch, None, float("-inf")
        level = log.info if why == "closed" else log.warning
        level("session ended", key=self.key, epoch=epoch, why=why)
        for cb in self.on_lost:
            cb(epoch)

    async def run(self) -> None:
        """Renew every ttl/3 for ever; reopen a new epoch after losing one. Cancel to stop.

        A lapse (validity ran out without a successful renewal) also ends the epoch: the
        contender may have expired us while we could not hear it, so we start over.
        """
        self._closed = False
        while not self._closed:
            raise_if_cancelling()
            started = self._clock()
            pause = self.interval
            if self.revision is None:
                await self.open()
            else:
                result = await self.renew()
                if result is RenewResult.ERROR:
                    # Retry soon: during a JetStream leader election every attempt that
                    # lands earlier buys validity; the attempt's own timeout paces us.
                    pause = min(pause, 0.25)
                    if self.revision is not None and not self.valid():
                        self._lose("validity ran out without a successful renewal")
            elapsed = self._clock() - started
            await asyncio.sleep(max(0.0, pause - elapsed))

    async def close(self, timeout: float = 2.0) -> None:
        """Mark the session closed so readers (and contenders) see it ended on purpose.

        We stop believing *before* the write is sent: once it lands, contenders treat our
        leases as free at once, so no moment may exist where they do and we still hold.
        """
        self._closed = True
        last = self.revision
        if last is None:
            return
        epoch = self.epoch
        self._lose("closed")
        for _ in range(3):
            try:
                await asyncio.wait_for(
                    self.kv.update(self.key, self._value("closed"), last=last), timeout
                )
                return
            except KeyWrongLastSequenceError:
                # A renewal of ours that was in flight may have landed first: close over it.
                try:
                    current = await self._current(timeout)
                except (TimeoutError, NatsError, OSError):
                    return
                mine = isinstance(current, SessionView) and current.epoch == epoch
                if not (mine and isinstance(current, SessionView) and current.alive):
                    return  # expired by someone else, or already replaced: nothing to close
                last = current.revision
            except TimeoutError:
                continue  # a loaded mesh: ask again (a write that landed meanwhile is seen
                # as a revision mismatch above and closed over)
            except (NatsError, OSError) as exc:
                log.debug("session close failed", key=self.key, error=repr(exc))
                return


async def expire(kv: KeyValue, key: str, view: SessionView, by: str, timeout: float = 2.0) -> bool:
    """A contender ends another agent's session: CAS on the revision it watched go stale.

    Returns True only if our write landed on exactly that revision; then the holder's next
    renewal fails and its leases may be taken over by CAS on each lease key.
    """
    body = {**view.data, "state": "expired", "expired_by": by, "time": now_rfc3339()}
    try:
        await asyncio.wait_for(
            kv.update(key, json.dumps(body, separators=(",", ":")).encode(), last=view.revision),
            timeout,
        )
    except (KeyWrongLastSequenceError, TimeoutError, NatsError, OSError):
        return False
    return True
