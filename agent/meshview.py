"""The whole mesh as one read-only snapshot: what ``harmony-agent status`` shows.

Read from the KV buckets, not from one agent, because the question at 3 a.m. is usually
"what does the *mesh* believe?", and the agent you would ask may be the one that is down.
``MeshState`` is fed raw KV entries (from a watch, so ``--watch`` and one-shot reads share
the code); ``snapshot()`` turns them into typed views. Decoding is tolerant: a value this
version cannot parse becomes a ``problem`` line, never an exception.

Health is judged by the reader: an agent is healthy when its heartbeat says ``alive``, its
own health check says healthy, and its last heartbeat write (JetStream's timestamp of that
write) is at most ``2 x ttl`` old on the reader's clock. The last rule catches an agent
that died without closing its session; it is for display only (leases never use it) and
is off by the clock offset between the reader and the mesh server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nats.js.kv import KeyValue

from agent.application import Application
from agent.commands.marks import Mark, parse_mark
from mesh.names import LEASES_BUCKET, STATE_BUCKET, TRUST_BUCKET

STALE_FACTOR = 2.0
INSTANCE_STATES = frozenset({"running", "standby", "stopped", "fenced", "failed"})


@dataclass(frozen=True)
class Raw:
    """One live KV entry: value, revision, and JetStream's timestamp of the write."""

    value: bytes
    revision: int
    written: datetime | None


def rfc3339(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Instance:
    """One agent's report of one application (the heartbeat's ``instances`` list)."""

    app: str
    agent: str
    state: str
    token: int | None
    detail: str
    stale: bool
    """The reporting agent is not healthy: this may no longer be true."""


@dataclass(frozen=True)
class AgentView:
    id: str
    site: str
    node: str
    state: str
    version: str | None
    ttl: float
    epoch: str | None
    last_seen: datetime | None
    started_at: str | None
    topology: str | None
    health: dict[str, Any]
    instances: tuple[dict[str, Any], ...]
    revision: int

    def age(self, now: datetime) -> float | None:
        return None if self.last_seen is None else (now - self.last_seen).total_seconds()

    def fresh(self, now: datetime) -> bool:
        age = self.age(now)
        return age is not None and age <= STALE_FACTOR * self.ttl

    def healthy(self, now: datetime) -> bool:
        return self.state == "alive" and self.health.get("healthy") is True and self.fresh(now)

    def in_quorum(self, now: datetime) -> bool:
        """What the agent last said, trusted only while its heartbeat is fresh and alive."""
        return self.state == "alive" and self.health.get("in_quorum") is True and self.fresh(now)


@dataclass(frozen=True)
class LeaseView:
    """A lease key as a reader sees it; the fencing token is the entry's revision."""

    key: str
    app: str
    site: str | None
    holder: str | None
    state: str
    handover_to: str | None
    token: int
    written: datetime | None


@dataclass(frozen=True)
class TrustView:
    site: str
    fingerprint: str | None
    not_after: str | None
    revision: int


@dataclass(frozen=True)
class MeshSnapshot:
    agents: dict[str, AgentView]
    apps: dict[str, Application]
    leases: dict[str, LeaseView]
    trust: dict[str, TrustView]
    drains: dict[str, Mark]
    fences: dict[str, Mark]
    problems: list[str] = field(default_factory=list)

    def sites(self) -> list[str]:
        names = {a.site for a in self.agents.values()} | set(self.trust) | set(self.drains)
        for app in self.apps.values():
            names.update(app.spec.placement.sites)
        return sorted(names)

    def lease_of(self, app: str) -> LeaseView | None:
        return self.leases.get(f"app.{app}")

    def slots_of(self, app: str) -> list[LeaseView]:
        return sorted(
            (v for v in self.leases.values() if v.app == app and v.site is not None),
            key=lambda v: v.site or "",
        )

    def instances_of(self, app: str, now: datetime) -> list[Instance]:
        out: list[Instance] = []
        for agent in sorted(self.agents.values(), key=lambda a: a.id):
            for item in agent.instances:
                if item.get("app") != app:
                    continue
                state = item.get("state")
                token = item.get("token")
                out.append(
                    Instance(
                        app=app,
                        agent=agent.id,
                        state=state if state in INSTANCE_STATES else "failed",
                        token=token if isinstance(token, int) else None,
                        detail=str(item.get("detail") or ""),
                        stale=not agent.healthy(now),
                    )
                )
        return out


class MeshState:
    """Live entries of the three buckets, keyed by (bucket, key); fed by KV watches."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], Raw] = {}

    def apply(self, bucket: str, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE"):
            self.entries.pop((bucket, entry.key), None)
        else:
            created: Any = entry.created  # typed int by nats-py, but a datetime in watches
            written = created if isinstance(created, datetime) else None
            self.entries[(bucket, entry.key)] = Raw(
                entry.value or b"", entry.revision or 0, written
            )

    def snapshot(self) -> MeshSnapshot:
        snap = MeshSnapshot({}, {}, {}, {}, {}, {})
        for (bucket, key), raw in sorted(self.entries.items()):
            if bucket == STATE_BUCKET:
                _state_entry(snap, key, raw)
            elif bucket == LEASES_BUCKET:
                _lease_entry(snap, key, raw)
            elif bucket == TRUST_BUCKET:
                _trust_entry(snap, key, raw)
        return snap


def _state_entry(snap: MeshSnapshot, key: str, raw: Raw) -> None:
    parts = key.split(".")
    if parts[0] == "agent" and len(parts) == 3:
        agent = _agent(parts[1], parts[2], raw)
        if agent is None:
            snap.problems.append(f"harmony-state {key}: not a heartbeat")
        else:
            snap.agents[agent.id] = agent
    elif parts[0] == "app" and len(parts) == 2:
        try:
            snap.apps[parts[1]] = Application.from_json(raw.value)
        except (ValueError, RecursionError):
            snap.problems.append(f"harmony-state {key}: not a valid Application")
    else:
        mark = parse_mark(key, raw.value, raw.revision)
        if mark is not None:
            (snap.drains if mark.kind == "drain" else snap.fences)[mark.target] = mark


def _agent(site: str, node: str, raw: Raw) -> AgentView | None:
    data = _json(raw.value)
    if data is None:
        return None
    try:
        ttl = float(data.get("ttl", 10.0))
    except (TypeError, ValueError):
        ttl = 10.0
    health = data.get("health")
    instances = data.get("instances")
    return AgentView(
        id=f"{site}/{node}",
        site=site,
        node=node,
        state=str(data.get("state", "alive")),
        version=data.get("version") if isinstance(data.get("version"), str) else None,
        ttl=ttl,
        epoch=str(data["epoch"]) if data.get("epoch") else None,
        last_seen=raw.written or parse_time(data.get("time")),
        started_at=data.get("started_at") if isinstance(data.get("started_at"), str) else None,
        topology=data.get("topology") if isinstance(data.get("topology"), str) else None,
        health=health if isinstance(health, dict) else {},
        instances=tuple(i for i in instances if isinstance(i, dict))
        if isinstance(instances, list)
        else (),
        revision=raw.revision,
    )


def _lease_entry(snap: MeshSnapshot, key: str, raw: Raw) -> None:
    parts = key.split(".")
    if parts[0] != "app" or len(parts) not in (2, 3):
        return
    data = _json(raw.value) or {}
    holder = data.get("holder")
    handover = data.get("handover_to")
    snap.leases[key] = LeaseView(
        key=key,
        app=parts[1],
        site=parts[2] if len(parts) == 3 else None,
        holder=holder if isinstance(holder, str) and holder else None,
        state=str(data.get("state", "held")),
        handover_to=handover if isinstance(handover, str) else None,
        token=raw.revision,
        written=raw.written or parse_time(data.get("acquired_at")),
    )


def _trust_entry(snap: MeshSnapshot, key: str, raw: Raw) -> None:
    parts = key.split(".")
    if parts[0] != "ca" or len(parts) != 2:
        return
    data = _json(raw.value) or {}
    fp, na = data.get("fingerprint"), data.get("not_after")
    snap.trust[parts[1]] = TrustView(
        site=str(data.get("site") or parts[1]),
        fingerprint=fp if isinstance(fp, str) else None,
        not_after=na if isinstance(na, str) else None,
        revision=raw.revision,
    )
