"""``status`` shows each instance's role, timeline and lag (and ``-o json`` has them)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from nats.js.kv import KeyValue

from agent.cli.status import status_document
from agent.cli.status_render import draw, human_bytes, render
from agent.meshview import MeshState
from mesh.names import STATE_BUCKET
from tests.commands.helpers import heartbeat

T0 = datetime(2030, 1, 1, tzinfo=UTC)
APP = {
    "apiVersion": "harmony/v1",
    "kind": "Application",
    "metadata": {"name": "ledger"},
    "spec": {
        "trait": "stateful",
        "placement": {"sites": ["a", "b", "c"]},
        "score": {"kind": "PostgreSQL", "replication_password_file": "/x"},
    },
}


def entry(key: str, value: object, rev: int) -> KeyValue.Entry:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return KeyValue.Entry(STATE_BUCKET, key, raw, rev, None, T0, None)  # type: ignore[arg-type]


def report(state: str, role: str | None, lag: int | None, **extra: object) -> dict[str, object]:
    return {
        "app": "ledger",
        "state": state,
        "token": 7 if role == "primary" else None,
        "detail": "ledger: ...",
        "replication": {
            "role": role,
            "running": role is not None,
            "position": 0x3000060,
            "timeline": 2 if role else None,
            "lag_bytes": lag,
            "detail": f"{role} on timeline 2",
        },
        **extra,
    }


def document() -> dict[str, object]:
    state = MeshState()
    state.apply(STATE_BUCKET, entry("app.ledger", APP, 1))
    for n, site in enumerate("abc", start=2):
        state.apply(STATE_BUCKET, entry(f"agent.{site}.n1", heartbeat(site, "n1", ttl=10), n))
    state.apply(STATE_BUCKET, entry("inst.ledger.a.n1", report("running", "primary", 0), 5))
    state.apply(STATE_BUCKET, entry("inst.ledger.b.n1", report("standby", "replica", 3 << 20), 6))
    broken = report("failed", None, None, error="start_replica: port 5432 is in use [port-in-use]")
    state.apply(STATE_BUCKET, entry("inst.ledger.c.n1", broken, 7))
    return status_document(state.snapshot(), T0)


def test_json_carries_role_timeline_lag_and_the_last_error() -> None:
    doc = document()
    (app,) = doc["applications"]  # type: ignore[union-attr]
    by_agent = {i["agent"]: i for i in app["instances"]}
    assert (by_agent["a/n1"]["role"], by_agent["a/n1"]["timeline"]) == ("primary", 2)
    assert (by_agent["b/n1"]["role"], by_agent["b/n1"]["lag_bytes"]) == ("replica", 3 << 20)
    assert by_agent["b/n1"]["position"] == 0x3000060
    assert by_agent["c/n1"]["role"] is None and "port-in-use" in by_agent["c/n1"]["error"]
    for inst in by_agent.values():  # the contract's fields are still there
        assert {"agent", "state", "token", "detail", "stale"} <= set(inst)


def test_the_table_shows_a_replication_section() -> None:
    text = draw(render(document(), wide=True), color=False)
    lines = text.splitlines()
    header = next(n for n, line in enumerate(lines) if line.startswith("APPLICATION   INSTANCE"))
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    assert rows[0][:6] == ["ledger", "a/n1", "primary", "running", "2", "-"]
    assert rows[1][:7] == ["ledger", "b/n1", "replica", "standby", "2", "3.0", "MiB"]
    assert rows[2][:4] == ["ledger", "c/n1", "-", "failed"] and "port-in-use" in lines[header + 3]
    assert "0/3000060" in lines[header + 1]


def test_no_replication_section_without_replicated_applications() -> None:
    doc = document()
    for app in doc["applications"]:  # type: ignore[union-attr]
        for inst in app["instances"]:
            inst["role"] = inst["timeline"] = None
    assert "ROLE" not in draw(render(doc), color=False)
    assert [human_bytes(v) for v in (None, 0, 1536, 5 << 30)] == ["-", "0 B", "1.5 KiB", "5.0 GiB"]
