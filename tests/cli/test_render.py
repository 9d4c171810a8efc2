"""Pure pieces of status: tolerant decoding of mesh entries, health by age, watch stability."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nats.js.kv import KeyValue

from agent.cli.status import status_document
from agent.cli.status_render import human_age, stable
from agent.meshview import MeshState
from mesh.names import STATE_BUCKET, TRUST_BUCKET, store_bucket
from tests.commands.helpers import heartbeat

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def entry(bucket: str, key: str, value: bytes, rev: int, op: str | None = None) -> KeyValue.Entry:
    return KeyValue.Entry(bucket, key, value, rev, None, T0, op)  # type: ignore[arg-type]


def test_health_follows_the_age_of_the_last_write() -> None:
    state = MeshState()
    state.apply(STATE_BUCKET, entry(STATE_BUCKET, "agent.a.n1", heartbeat("a", "n1", ttl=2), 1))
    agent = state.snapshot().agents["a/n1"]
    assert agent.healthy(T0 + timedelta(seconds=4)) and agent.in_quorum(T0)
    assert not agent.healthy(T0 + timedelta(seconds=4.1))
    assert not agent.in_quorum(T0 + timedelta(seconds=5))


def test_garbage_values_become_problems_not_exceptions() -> None:
    state = MeshState()
    for bucket, key, value in [
        (STATE_BUCKET, "agent.a.n1", b"\xff"),
        (STATE_BUCKET, "app.x", b'{"kind": "Application"}'),
        (STATE_BUCKET, "something.else", b"?"),
        (store_bucket("s"), "lease.x.a.n1", b"[[["),
        (TRUST_BUCKET, "ca.a", b"null"),
    ]:
        state.apply(bucket, entry(bucket, key, value, 1))
    snap = state.snapshot()
    doc = status_document(snap, T0)
    assert len(doc["problems"]) == 3  # heartbeat, application, lease of an unknown app
    assert doc["trust"] == [
        {
            "site": "a",
            "fingerprint": None,
            "not_after": None,
            "revision": 1,
            "state": "rejected:malformed",
            "detail": "not a JSON object",
        }
    ]
    state.apply(STATE_BUCKET, entry(STATE_BUCKET, "app.x", b"", 2, op="DEL"))
    assert len(status_document(state.snapshot(), T0)["problems"]) == 2


def test_stable_ignores_only_volatile_fields() -> None:
    a = {"generated_at": "t1", "agents": [{"id": "x", "age": 1.0, "healthy": True}]}
    b = {"generated_at": "t2", "agents": [{"id": "x", "age": 2.0, "healthy": True}]}
    c = {"generated_at": "t2", "agents": [{"id": "x", "age": 2.0, "healthy": False}]}
    assert stable(a) == stable(b) != stable(c)


def test_human_age() -> None:
    assert [human_age(s) for s in (None, 0.25, 5, 61, 7200, 90000)] == [
        "-",
        "250ms",
        "5s",
        "1m",
        "2h",
        "1d",
    ]
