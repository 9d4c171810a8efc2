"""Mesh fixtures for command-plane and CLI tests: write what agents and the controller
would write (heartbeats with ``instances``, leases, Applications, CA entries) into a real
nats-server, so rendering and commands are checked against known truth."""

from __future__ import annotations

import json
from typing import Any

import nats
from nats.aio.client import Client

from agent.application import parse_documents
from mesh.bootstrap import Buckets, ensure_mesh
from mesh.clock import now_rfc3339

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
    instances: list[dict[str, Any]] | None = None,
    time: str | None = None,
) -> bytes:
    body = {
        "agent": f"{site}/{node}",
        "site": site,
        "node": node,
        "version": "0.1.0",
        "started_at": now_rfc3339(),
        "time": time or now_rfc3339(),
        "ttl": ttl,
        "state": state,
        "epoch": f"epoch-{site}",
        "seq": 1,
        "topology": "localhost",
        "health": {
            "ready": healthy,
            "healthy": healthy,
            "connected": True,
            "in_quorum": in_quorum,
        },
        "instances": instances or [],
    }
    return json.dumps(body).encode()


def lease(holder: str, state: str = "held", handover_to: str | None = None) -> bytes:
    site, _, node = holder.partition("/")
    body: dict[str, Any] = {
        "holder": holder,
        "session": f"agent.{site}.{node}",
        "epoch": f"epoch-{site}",
        "session_rev": 1,
        "ttl": 10.0,
        "acquired_at": now_rfc3339(),
        "state": state,
    }
    if handover_to:
        body["handover_to"] = handover_to
    return json.dumps(body).encode()


def ca_entry(site: str) -> bytes:
    return json.dumps(
        {
            "site": site,
            "fingerprint": "sha256:" + "ab" * 32,
            "not_after": "2036-01-01T00:00:00Z",
            "certificate": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
        }
    ).encode()


async def connect(url: str, **kwargs: Any) -> tuple[Client, Buckets]:
    nc = await nats.connect(servers=[url], **kwargs)
    return nc, await ensure_mesh(nc.jetstream(), 1)


async def seed_apps(buckets: Buckets) -> None:
    for app in parse_documents(APPS_YAML):
        await buckets.state.put(f"app.{app.name}", app.to_json())


async def seed_world(buckets: Buckets) -> dict[str, int]:
    """Three sites; ledger held by site-a/node-1 (running) with a standby on site-b;
    web running on site-a and site-b; site-c's agent is dead (expired). Returns the
    fencing tokens (lease revisions) written."""
    await seed_apps(buckets)
    tokens = {
        "ledger": await buckets.leases.put("app.ledger", lease("site-a/node-1")),
        "web.site-a": await buckets.leases.put("app.web.site-a", lease("site-a/node-1")),
        "web.site-b": await buckets.leases.put("app.web.site-b", lease("site-b/node-1")),
    }
    a_instances: list[dict[str, Any]] = [
        {"app": "ledger", "state": "running", "token": tokens["ledger"], "detail": "pid 10"},
        {"app": "web", "state": "running", "token": tokens["web.site-a"], "detail": "pid 11"},
    ]
    b_instances: list[dict[str, Any]] = [
        {"app": "ledger", "state": "standby", "token": None, "detail": ""},
        {"app": "web", "state": "running", "token": tokens["web.site-b"], "detail": "pid 12"},
    ]
    await buckets.state.put(
        "agent.site-a.node-1", heartbeat("site-a", "node-1", instances=a_instances)
    )
    await buckets.state.put(
        "agent.site-b.node-1", heartbeat("site-b", "node-1", instances=b_instances)
    )
    await buckets.state.put(
        "agent.site-c.node-1",
        heartbeat(
            "site-c",
            "node-1",
            state="expired",
            instances=[{"app": "ledger", "state": "running", "token": 1, "detail": "old"}],
        ),
    )
    await buckets.trust.put("ca.site-a", ca_entry("site-a"))
    return tokens
