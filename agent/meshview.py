"""The whole mesh as one read-only snapshot: what ``harmony-agent status`` shows.

Read from the KV buckets, not from one agent, because the question at 3 a.m. is usually
"what does the *mesh* believe?", and the agent you would ask may be the one that is down.
``MeshState`` is fed raw KV entries (from a watch, so ``--watch`` and one-shot reads share
the code); ``snapshot()`` turns them into typed views. Decoding is tolerant: a value this
version cannot parse becomes a ``problem`` line, never an exception.

Health is judged by the reader: an agent is healthy when its summary
(``agent.<site>.<node>``) says ``alive`` and healthy, and its session was renewed in some
lease store at most ``2 x ttl`` ago (JetStream's timestamp of that write, on the reader's
clock). The last rule catches an agent that died without closing its session; it is for
display only (leases never use it) and is off by the clock offset between the reader and
the mesh server.

Holders and fencing tokens come from the lease stores: a claim counts when it is the newest
held claim of its family in a majority of the stores the reader sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.commands.marks import Mark, parse_mark
from mesh.names import STATE_BUCKET, STORE_PREFIX, TRUST_BUCKET
from mesh.records import ClaimRecord, ClaimState, parse_claim, parse_key, parse_session

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

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


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    pid: int | None = None
    partitioned: bool = False
    deadline_enforced: bool | None = None
    """Whether the lease deadline holds without the agent (None: not reported)."""
    role: str | None = None
    """Replicated Scores: ``primary`` or ``replica`` (None: no data, or not replicated)."""
    timeline: int | None = None
    lag_bytes: int | None = None
    position: int | None = None
    replication_detail: str | None = None
    error: str | None = None
    """The last start or role change failed with this."""


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
    stores: tuple[str, ...] = ()
    """The lease stores where the agent's session is live."""
    warnings: tuple[str, ...] = ()
    """Certificates the agent uses that expire within 30 days (or have expired)."""

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
    """A ``ca.<site>`` entry as ``mesh.trust.describe`` sees it: the site is the KV key's and
    the fingerprint is computed from the certificate, never read from the entry."""

    site: str
    fingerprint: str | None
    not_after: str | None
    revision: int
    state: str = "unverified"
    """trusted, revoked, rejected:<reason>, or unverified/unverified-revoked (no trust-admin
    public key: ``$HARMONY_TRUST_ADMIN_PUBLIC_KEY``)."""
    detail: str | None = None


TRAITS = frozenset({"stateful", "stateless"})
STRATEGIES = frozenset({"AbsoluteConsistency", "SplitBrainAllowed"})
RECONCILES = frozenset({"keep-newest", "keep-oldest"})


@dataclass(frozen=True)
class AppView:
    """What a reader shows of a stored Application (``app.<name>``), decoded without the
    pydantic models: ``apply`` validated it when it was written, and a display must stay
    cheap (``status`` would otherwise spend most of its time importing pydantic)."""

    name: str
    trait: str
    strategy: str
    reconcile: str
    sites: tuple[str, ...]
    score: str

    @classmethod
    def decode(cls, name: str, raw: bytes) -> AppView | None:
        """None when the value is not an Application this version can show."""
        doc = _json(raw)
        spec = doc.get("spec") if doc else None
        if not isinstance(spec, dict) or doc is None or doc.get("kind") != "Application":
            return None
        failover = spec.get("failover") or {}
        placement = spec.get("placement") or {}
        score = spec.get("score") or {}
        if not (
            isinstance(failover, dict) and isinstance(placement, dict) and isinstance(score, dict)
        ):
            return None
        trait = spec.get("trait")
        strategy = failover.get("strategy", "AbsoluteConsistency")
        reconcile = failover.get("reconcile", "keep-newest")
        sites = placement.get("sites")
        kind = score.get("kind")
        if (
            trait not in TRAITS
            or strategy not in STRATEGIES
            or reconcile not in RECONCILES
            or not isinstance(sites, list)
            or not sites
            or not all(isinstance(x, str) for x in sites)
            or not isinstance(kind, str)
        ):
            return None
        return cls(name, trait, strategy, reconcile, tuple(sites), kind)


@dataclass(frozen=True)
class MeshSnapshot:
    agents: dict[str, AgentView]
    apps: dict[str, AppView]
    leases: dict[str, LeaseView]
    trust: dict[str, TrustView]
    drains: dict[str, Mark]
    fences: dict[str, Mark]
    problems: list[str] = field(default_factory=list)

    reports: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """app -> agent -> its instance report (``inst.<app>.<site>.<node>``)."""
    slots: dict[str, list[LeaseView]] = field(default_factory=dict)
    """app -> its stateless slots (by site), indexed once: a scan of every lease for each
    application was O(applications^2)."""

    def sites(self) -> list[str]:
        names = {a.site for a in self.agents.values()} | set(self.trust) | set(self.drains)
        for app in self.apps.values():
            names.update(app.sites)
        return sorted(names)

    def lease_of(self, app: str) -> LeaseView | None:
        return self.leases.get(f"app.{app}")

    def slots_of(self, app: str) -> list[LeaseView]:
        return sorted(self.slots.get(app, ()), key=lambda v: v.site or "")

    def instances_of(self, app: str, now: datetime) -> list[Instance]:
        out: list[Instance] = []
        for agent_id, item in sorted(self.reports.get(app, {}).items()):
            agent = self.agents.get(agent_id)
            state = item.get("state")
            token = item.get("token")
            pid = item.get("pid")
            enforced = item.get("deadline_enforced")
            rep = item.get("replication")
            rep = rep if isinstance(rep, dict) else {}
            error = item.get("error")
            out.append(
                Instance(
                    app=app,
                    agent=agent_id,
                    state=state if state in INSTANCE_STATES else "failed",
                    token=token if isinstance(token, int) else None,
                    detail=str(item.get("detail") or ""),
                    stale=agent is None or not agent.healthy(now),
                    pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                    partitioned=item.get("partitioned") is True,
                    deadline_enforced=enforced if isinstance(enforced, bool) else None,
                    role=rep["role"] if rep.get("role") in ("primary", "replica") else None,
                    timeline=_number(rep.get("timeline")),
                    lag_bytes=_number(rep.get("lag_bytes")),
                    position=_number(rep.get("position")),
                    replication_detail=str(rep["detail"]) if rep.get("detail") else None,
                    error=error if isinstance(error, str) and error else None,
                )
            )
        return out


class MeshState:
    """Live entries of the buckets and lease stores, keyed by (bucket, key); fed by KV
    watches."""

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
        stores: dict[str, dict[str, tuple[str, Raw]]] = {}
        for (bucket, key), raw in sorted(self.entries.items()):
            if bucket == STATE_BUCKET:
                _state_entry(snap, key, raw)
            elif bucket == TRUST_BUCKET:
                _trust_entry(snap, key, raw)
            elif bucket.startswith(STORE_PREFIX):
                stores.setdefault(bucket[len(STORE_PREFIX) :], {})[key] = (key, raw)
        _store_entries(snap, stores)
        return snap


def _state_entry(snap: MeshSnapshot, key: str, raw: Raw) -> None:
    parts = key.split(".")
    if parts[0] == "agent" and len(parts) == 3:
        agent = _agent(parts[1], parts[2], raw)
        if agent is None:
            snap.problems.append(f"harmony-state {key}: not a heartbeat")
        else:
            snap.agents[agent.id] = agent
    elif parts[0] == "inst" and len(parts) == 4:
        data = _json(raw.value)
        if data is not None:
            snap.reports.setdefault(parts[1], {})[f"{parts[2]}/{parts[3]}"] = data
    elif parts[0] == "app" and len(parts) == 2:
        app = AppView.decode(parts[1], raw.value)
        if app is None:
            snap.problems.append(f"harmony-state {key}: not a valid Application")
        else:
            snap.apps[parts[1]] = app
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
    warnings = data.get("warnings")
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
        warnings=tuple(str(w)[:200] for w in warnings[:10]) if isinstance(warnings, list) else (),
    )


def _store_entries(snap: MeshSnapshot, stores: dict[str, dict[str, tuple[str, Raw]]]) -> None:
    """Sessions refresh each agent's ``last_seen``; claims become holders and tokens."""
    n = len(stores)
    families: dict[str, list[tuple[str, int, str, Raw]]] = {}
    for store, keys in stores.items():
        for key, raw in keys.values():
            parts = parse_key(key)
            if parts.kind == "session":
                rec = parse_session(raw.value, key, raw.revision)
                agent = snap.agents.get(parts.agent)
                if agent is not None and rec is not None and rec.state.value == "alive":
                    seen = agent.last_seen
                    if raw.written is not None and (seen is None or raw.written > seen):
                        seen = raw.written
                    snap.agents[parts.agent] = replace(
                        agent, last_seen=seen, epoch=rec.epoch, stores=(*agent.stores, store)
                    )
            elif parts.kind in ("lease", "slot"):
                families.setdefault(parts.family, []).append((store, raw.revision, key, raw))
    bad: list[tuple[str, str]] = []
    for family, claims in families.items():
        _family(snap, family, claims, n, bad)
    for store, key in sorted(bad):
        snap.problems.append(f"{STORE_PREFIX}{store} {key}: not a lease claim")


def _family(
    snap: MeshSnapshot,
    family: str,
    claims: list[tuple[str, int, str, Raw]],
    n: int,
    bad: list[tuple[str, str]],
) -> None:
    latest: dict[str, tuple[int, str, Raw]] = {}
    records: dict[tuple[str, str], ClaimRecord | None] = {}
    for store, seq, key, raw in claims:
        rec = records[(store, key)] = parse_claim(raw.value, key, raw.revision)
        if rec is None:
            bad.append((store, key))
        if store not in latest or seq > latest[store][0]:
            latest[store] = (seq, key, raw)
    votes: dict[tuple[str, int, str], int] = {}
    newest: dict[tuple[str, int, str], Raw] = {}
    for store, (_, key, raw) in latest.items():
        rec = records[(store, key)]
        if rec is None:
            continue
        who = parse_key(key).agent
        mark = (
            who,
            rec.term,
            rec.state.value if rec.state is not ClaimState.HANDOVER else f"handover:{rec.to}",
        )
        votes[mark] = votes.get(mark, 0) + 1
        newest[mark] = raw
    parts = family.split(".")
    app, site = parts[1], parts[2] if parts[0] == "slot" else None
    label = f"app.{app}" if site is None else f"app.{app}.{site}"
    if not votes:
        return
    (who, term, state), count = max(votes.items(), key=lambda kv: (kv[1], kv[0][1]))
    handover = state.split(":", 1)[1] if state.startswith("handover:") else None
    held = state == ClaimState.HELD.value and count >= n // 2 + 1
    view = snap.leases[label] = LeaseView(
        key=label,
        app=app,
        site=site,
        holder=who if held or handover else None,
        state="held" if held else ("handover" if handover else "free"),
        handover_to=handover,
        token=term,
        written=newest[(who, term, state)].written,
    )
    if site is not None:
        snap.slots.setdefault(app, []).append(view)


TRUST_ADMIN_ENV = "HARMONY_TRUST_ADMIN_PUBLIC_KEY"


def _trust_entry(snap: MeshSnapshot, key: str, raw: Raw) -> None:
    parts = key.split(".")
    if parts[0] != "ca" or len(parts) != 2:
        return
    import os

    from mesh.trust import TrustError, describe, parse_admin_public_key

    admin = None
    if os.environ.get(TRUST_ADMIN_ENV):
        try:
            admin = parse_admin_public_key(os.environ[TRUST_ADMIN_ENV])
        except TrustError as exc:
            problem = f"${TRUST_ADMIN_ENV}: {exc}"
            if problem not in snap.problems:
                snap.problems.append(problem)
    view = describe(key, raw.value, admin)
    snap.trust[parts[1]] = TrustView(
        site=view.site or parts[1],
        fingerprint=view.fingerprint,
        not_after=view.not_after,
        revision=raw.revision,
        state=view.state,
        detail=view.detail or None,
    )
