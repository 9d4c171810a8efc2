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
"""

from __future__ import annotations

import asyncio
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
        self.on_renew: list[Callable[[RenewResult, float], None]] = []
        self.on_new_epoch: list[Callable[[str], None]] = []
        self.on_lost: list[Callable[[str], None]] = []

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

    def _value(self, state: str = "alive") -> bytes:
        self.seq += 1
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
        self.valid_until = sent + self.ttl - self.margin

    async def open(self, timeout: float | None = None) -> bool:
        """Start a new epoch by CAS over whatever the key holds. False on mesh error."""
        timeout = timeout or self.interval
        self.epoch = uuid.uuid4().hex[:16]
        self.revision = None
        self.valid_until = float("-inf")
        for _ in range(5):
            try:
                try:
                    entry = await asyncio.wait_for(self.kv.get(self.key), timeout)
                    last: int | None = entry.revision
                except KeyNotFoundError:
                    last = None
                sent = self._clock()
                if last is None:
                    rev = await asyncio.wait_for(self.kv.create(self.key, self._value()), timeout)
                else:
                    rev = await asyncio.wait_for(
                        self.kv.update(self.key, self._value(), last=last), timeout
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

    async def renew(self) -> RenewResult:
        if self.revision is None:
            return RenewResult.LOST
        sent = self._clock()
        timeout = max(
            0.05, min(self.interval, self.valid_until - sent) if self.valid(sent) else self.interval
        )
        try:
            rev = await asyncio.wait_for(
                self.kv.update(self.key, self._value(), last=self.revision), timeout
            )
        except KeyWrongLastSequenceError:
            result = RenewResult.LOST
        except (TimeoutError, NatsError, OSError) as exc:
            log.debug("session renewal failed", key=self.key, error=repr(exc))
            result = RenewResult.ERROR
        else:
            self._accepted(sent, rev)
            result = RenewResult.OK
        if result is RenewResult.LOST:
            self._lose("expired by another agent")
        for cb in self.on_renew:
            cb(result, self._clock() - sent)
        return result

    def _lose(self, why: str) -> None:
        epoch, self.revision, self.valid_until = self.epoch, None, float("-inf")
        log.warning("session lost", key=self.key, epoch=epoch, why=why)
        for cb in self.on_lost:
            cb(epoch)

    async def run(self) -> None:
        """Renew every ttl/3 for ever; reopen a new epoch after losing one. Cancel to stop.

        A lapse (validity ran out without a successful renewal) also ends the epoch: the
        contender may have expired us while we could not hear it, so we start over.
        """
        while True:
            started = self._clock()
            if self.revision is None:
                await self.open()
            else:
                result = await self.renew()
                if result is RenewResult.ERROR and not self.valid():
                    self._lose("validity ran out without a successful renewal")
            elapsed = self._clock() - started
            await asyncio.sleep(max(0.0, self.interval - elapsed))

    async def close(self, timeout: float = 2.0) -> None:
        """Mark the session closed so readers (and contenders) see it ended on purpose."""
        if self.revision is None:
            return
        try:
            await asyncio.wait_for(
                self.kv.update(self.key, self._value("closed"), last=self.revision), timeout
            )
        except (KeyWrongLastSequenceError, TimeoutError, NatsError, OSError) as exc:
            log.debug("session close failed", key=self.key, error=repr(exc))
        self.revision, self.valid_until = None, float("-inf")


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
