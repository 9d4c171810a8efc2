"""Mesh fixtures for command-plane and CLI tests: write what agents and the controller
would write (summaries, instance reports, sessions and claims in the lease store,
Applications, CA entries) into a real nats-server, so rendering and commands are checked
against known truth."""

from __future__ import annotations

import json
from typing import Any

import nats
from nats.aio.client import Client

from agent.application import parse_documents
from mesh.bootstrap import Mesh, ensure_mesh
from mesh.clock import now_rfc3339
from mesh.names import (
    lease_claim_key,
    lease_family,
    session_key,
    slot_claim_key,
    slot_family,
    store_subject,
)
from mesh.records import ClaimRecord, ClaimState, SessionRecord, SessionState

APPS_YAML = """\
apiVersion: harmony/v1
kind: Application
metadata: {name: ledger}
spec:
  trait: stateful
  failover: {strategy: AbsoluteConsistency}
  placement: {sites: [site-a, site-b, site-c]}
  score: {kind: Process, command: [sleep, "1000"]}
---
apiVersion: harmony/v1
kind: Application
metadata: {name: web}
spec:
  trait: stateless
  failover: {strategy: SplitBrainAllowed, reconcile: keep-oldest}
  placement: {sites: [site-a, site-b]}
  score: {kind: Process, command: [python3, -m, http.server, "8080"]}
"""


def heartbeat(
    site: str,
    node: str,
    *,
    state: str = "alive",
    healthy: bool = True,
    in_quorum: bool = True,
    ttl: float = 10.0,
    time: str | None = None,
) -> bytes:
    """An agent's summary (``agent.<site>.<node>``) as the daemon writes it."""
    body = {
        "agent": f"{site}/{node}",
        "site": site,
        "node": node,
        "version": "0.1.0",
        "started_at": now_rfc3339(),
        "time": time or now_rfc3339(),
        "ttl": ttl,
        "state": state,
        "topology": "localhost",
        "health": {
            "ready": healthy,
            "healthy": healthy,
            "connected": True,
            "in_quorum": in_quorum,
        },
    }
    return json.dumps(body).encode()


def report(app: str, state: str, token: int | None, detail: str = "") -> bytes:
    """An instance report (``inst.<app>.<site>.<node>``)."""
    body = {"app": app, "state": state, "token": token, "detail": detail, "time": now_rfc3339()}
    return json.dumps(body).encode()


_CA_ENTRIES: dict[str, tuple[bytes, str]] = {}


def ca_entry(site: str) -> bytes:
    """A real ``ca.<site>`` entry: the site's CA certificate signed by a trust-admin key
    (readers recompute its fingerprint; see ``ca_fingerprint``)."""
    if site not in _CA_ENTRIES:
        import tempfile
        from pathlib import Path

        from cryptography.hazmat.primitives.asymmetric import ed25519

        from mesh.trust import SiteCA, fingerprint, sign_entry

        with tempfile.TemporaryDirectory() as tmp:
            ca = SiteCA.create(site, Path(tmp) / "ca")
        admin = ed25519.Ed25519PrivateKey.generate()
        _CA_ENTRIES[site] = (sign_entry(site, ca.cert, admin, 1), fingerprint(ca.cert))
    return _CA_ENTRIES[site][0]


def ca_fingerprint(site: str) -> str:
    """The fingerprint of ``ca_entry(site)``'s certificate."""
    ca_entry(site)
    return _CA_ENTRIES[site][1]


STORE = "solo"
"""The single lease store of the ``nats_server`` fixture (tagged ``site:solo``)."""


async def connect(url: str, **kwargs: Any) -> tuple[Client, Mesh]:
    nc = await nats.connect(servers=[url], **kwargs)
    return nc, await ensure_mesh(nc.jetstream(), 1, stores=[STORE])


async def seed_apps(mesh: Mesh) -> None:
    for app in parse_documents(APPS_YAML):
        await mesh.state.put(f"app.{app.name}", app.to_json())


async def write_session(nc: Client, agent: str, state: str = "alive") -> None:
    site, node = agent.split("/")
    rec = SessionRecord(f"epoch-{site}", SessionState(state), 10.0, 1)
    await nc.jetstream().publish(store_subject(STORE, session_key(site, node)), rec.encode())


async def write_claim(
    nc: Client,
    family: str,
    agent: str,
    term: int,
    state: ClaimState = ClaimState.HELD,
    to: str | None = None,
) -> int:
    """Write a claim into the store as ``agent`` would (no CAS: a fixture, not a race)."""
    site, node = agent.split("/")
    app = family.split(".")[1]
    if family.startswith("lease."):
        key = lease_claim_key(app, site, node)
    else:
        key = slot_claim_key(app, site, node)
    rec = ClaimRecord(f"epoch-{site}", term, state, to, 10.0)
    ack = await nc.jetstream().publish(store_subject(STORE, key), rec.encode())
    return term if ack.seq else 0


async def seed_world(mesh: Mesh, nc: Client | None = None) -> dict[str, int]:
    """Three sites; ledger held by site-a/node-1 (running) with a standby on site-b;
    web running on site-a and site-b; site-c's agent is gone (closed). Returns the
    fencing tokens (terms) written."""
    assert nc is not None
    await seed_apps(mesh)
    tokens = {"ledger": 101, "web.site-a": 102, "web.site-b": 103}
    for agent in ("site-a/node-1", "site-b/node-1"):
        await write_session(nc, agent)
    await write_session(nc, "site-c/node-1", "closed")
    await write_claim(nc, lease_family("ledger"), "site-a/node-1", tokens["ledger"])
    await write_claim(nc, slot_family("web", "site-a"), "site-a/node-1", tokens["web.site-a"])
    await write_claim(nc, slot_family("web", "site-b"), "site-b/node-1", tokens["web.site-b"])
    put = mesh.state.put
    await put("agent.site-a.node-1", heartbeat("site-a", "node-1"))
    await put("agent.site-b.node-1", heartbeat("site-b", "node-1"))
    await put("agent.site-c.node-1", heartbeat("site-c", "node-1", state="closed"))
    await put("inst.ledger.site-a.node-1", report("ledger", "running", tokens["ledger"], "pid 10"))
    await put("inst.web.site-a.node-1", report("web", "running", tokens["web.site-a"], "pid 11"))
    await put("inst.ledger.site-b.node-1", report("ledger", "standby", None))
    await put("inst.web.site-b.node-1", report("web", "running", tokens["web.site-b"], "pid 12"))
    await put("inst.ledger.site-c.node-1", report("ledger", "running", 1, "old"))
    await mesh.trust.put("ca.site-a", ca_entry("site-a"))
    return tokens
