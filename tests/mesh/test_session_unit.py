"""Session deadlines and margins with a fake clock and an in-memory CAS store (no NATS)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mesh.session import RenewResult, Session, decode, expire


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Entry:
    key: str
    value: bytes
    revision: int


@dataclass
class FakeKV:
    """Per-key CAS like JetStream KV; ``lag`` turns the next write into a late landing."""

    clock: FakeClock
    rtt: float = 0.01
    data: dict[str, Entry] = field(default_factory=dict)
    seq: int = 0
    fail_next: bool = False
    land_then_timeout: bool = False

    async def get(self, key: str) -> Entry:
        if key not in self.data:
            raise KeyNotFoundError
        return self.data[key]

    def _write(self, key: str, value: bytes, last: int) -> int:
        cur = self.data.get(key)
        if (cur.revision if cur else 0) != last:
            raise KeyWrongLastSequenceError
        self.clock.now += self.rtt
        if self.fail_next:
            self.fail_next = False
            raise TimeoutError
        self.seq += 1
        self.data[key] = Entry(key, value, self.seq)
        if self.land_then_timeout:
            self.land_then_timeout = False
            raise TimeoutError
        return self.seq

    async def create(self, key: str, value: bytes) -> int:
        return self._write(key, value, 0)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        return self._write(key, value, last or 0)


def make(ttl: float = 3.0, margin: float = 0.5) -> tuple[Session, FakeKV, FakeClock]:
    clock = FakeClock()
    kv = FakeKV(clock)
    s = Session(cast(KeyValue, kv), "agent.a.n1", "a/n1", ttl=ttl, margin=margin, clock=clock)
    return s, kv, clock


async def test_validity_is_send_time_plus_ttl_minus_margin() -> None:
    s, _kv, clock = make()
    sent = clock.now
    assert await s.open()
    assert s.valid_until == pytest.approx(sent + 3.0 - 0.5)
    assert s.last_latency == pytest.approx(0.01)
    clock.now = sent + 2.49
    assert s.valid() and s.in_quorum()
    clock.now = sent + 2.5
    assert not s.valid()
    assert s.in_quorum()  # quorum evidence lasts a full ttl, validity ttl - margin


async def test_failed_renewal_extends_nothing_and_deadline_ends_the_epoch() -> None:
    s, kv, clock = make()
    lost: list[str] = []
    s.on_lost.append(lost.append)
    assert await s.open()
    until = s.valid_until
    clock.now += 1.0
    kv.fail_next = True
    assert await s.renew() is RenewResult.ERROR
    assert s.valid_until == until
    clock.now = until
    s.check_deadline()  # what the deadline timer calls, at the deadline
    assert lost == [s.epoch] and s.revision is None and not s.valid()


async def test_renewal_by_cas_detects_an_expiry() -> None:
    s, kv, _clock = make()
    lost: list[str] = []
    s.on_lost.append(lost.append)
    assert await s.open()
    entry = await kv.get(s.key)
    view = decode(entry.value, entry.revision)
    assert view is not None
    assert await expire(cast(KeyValue, kv), s.key, view, by="b/n1")
    assert await s.renew() is RenewResult.LOST
    assert lost == [s.epoch] and not s.valid()


async def test_renewal_that_landed_without_answer_is_adopted_from_its_send_time() -> None:
    s, kv, clock = make()
    assert await s.open()
    clock.now += 1.0
    sent = clock.now
    kv.land_then_timeout = True
    assert await s.renew() is RenewResult.ERROR
    clock.now += 0.5
    # next CAS fails against the revision that landed; the session recognises its own write
    assert await s.renew() is RenewResult.OK
    assert s.valid()
    assert s.valid_until >= sent + 3.0 - 0.5


async def test_wall_clock_jumps_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    s, _kv, clock = make()
    assert await s.open()
    base = s.valid_until
    real = time.time
    for jump in (-86400.0, 3600.0):
        monkeypatch.setattr(time, "time", lambda j=jump: real() + j)
        clock.now += 0.5
        sent = clock.now
        assert await s.renew() is RenewResult.OK
        assert s.valid_until == pytest.approx(sent + 2.5)
    assert s.valid_until == pytest.approx(base + 1.0 + 2 * 0.01)  # two rtts of the fake


async def test_close_stops_believing_before_it_writes() -> None:
    s, kv, _clock = make()
    assert await s.open()
    seen: list[bool] = []

    original = kv.update

    async def spy(key: str, value: bytes, last: int | None = None) -> int:
        seen.append(s.valid())
        return await original(key, value, last)

    kv.update = spy  # type: ignore[method-assign]
    await s.close()
    assert seen == [False]
    body: dict[str, Any] = json.loads((await kv.get(s.key)).value)
    assert body["state"] == "closed"


async def test_closed_or_own_epoch_is_replaced_at_once() -> None:
    s, _kv, clock = make()
    assert await s.open()
    first = s.epoch
    clock.now += 10.0  # our epoch lapsed; it is ours, so no wait is needed
    s.check_deadline()
    assert await s.open()
    assert s.epoch != first and s.valid()


async def test_close_lands_over_our_own_renewal_that_landed_first() -> None:
    s, kv, _clock = make()
    assert await s.open()
    kv.land_then_timeout = True
    assert await s.renew() is RenewResult.ERROR  # landed, unanswered: our revision is stale
    await s.close()
    body: dict[str, Any] = json.loads((await kv.get(s.key)).value)
    assert body["state"] == "closed"


async def test_close_does_not_overwrite_an_expiry() -> None:
    s, kv, _clock = make()
    assert await s.open()
    entry = await kv.get(s.key)
    view = decode(entry.value, entry.revision)
    assert view is not None and await expire(cast(KeyValue, kv), s.key, view, by="b/n1")
    await s.close()
    body: dict[str, Any] = json.loads((await kv.get(s.key)).value)
    assert body["state"] == "expired"
