"""Every NATS name of the mesh, in one place so no subject or key is spelled twice.

Why the key layout looks like this: every key an agent writes contains its own
``<site>.<node>``, so NATS permissions can give each agent exactly its own keys with subject
wildcards (docs/security.md), and the lease protocol never needs to write another agent's
key (docs/leases.md).
"""

from __future__ import annotations

STATE_BUCKET = "harmony-state"
TRUST_BUCKET = "harmony-trust"
EVENTS_STREAM = "harmony-events"
EVENTS_SUBJECTS = ("harmony.events.>", "harmony.audit.>")
STORE_PREFIX = "harmony-leases-"
SUMMARY_REFRESH_S = 60.0
"""An agent rewrites its ``agent.<site>.<node>`` record on change and at least this often
(its liveness is its session in the lease stores, renewed every ttl/3)."""
"""Lease stores: one single-replica KV bucket per store site (docs/leases.md)."""
LEASE_VIEW_BUCKET = "harmony-leases"
"""CONTRACT section 7: who holds each lease, published by holders (mesh/mirror.py). A view
for tools and people; leases are decided in the stores, never here."""

# --- harmony-state keys ------------------------------------------------------------------
APP_PREFIX = "app."
AGENT_PREFIX = "agent."
INSTANCE_PREFIX = "inst."
DRAIN_PREFIX = "drain."
FENCE_PREFIX = "fence."
MESH_KEY = "mesh"
"""The mesh descriptor: the lease stores every agent must agree on."""


def app_key(name: str) -> str:
    """Application spec in ``harmony-state``."""
    return f"{APP_PREFIX}{name}"


def agent_key(site: str, node: str) -> str:
    """An agent's status summary in ``harmony-state`` (written on change, not renewed)."""
    return f"{AGENT_PREFIX}{site}.{node}"


def instance_key(app: str, site: str, node: str) -> str:
    """One agent's report of one application's instance in ``harmony-state``."""
    return f"{INSTANCE_PREFIX}{app}.{site}.{node}"


def drain_key(site: str) -> str:
    return f"{DRAIN_PREFIX}{site}"


def fence_key(app: str) -> str:
    return f"{FENCE_PREFIX}{app}"


def trust_key(site: str) -> str:
    return f"ca.{site}"


def lease_view_key(lease: str) -> str:
    """``app.<name>`` for a stateful lease, ``app.<name>.<site>`` for a slot (``name@site``)."""
    app, _, site = lease.partition("@")
    return f"app.{app}.{site}" if site else f"app.{app}"


# --- lease stores ------------------------------------------------------------------------
def store_bucket(store: str) -> str:
    return f"{STORE_PREFIX}{store}"


def store_stream(store: str) -> str:
    return f"KV_{store_bucket(store)}"


def store_subject(store: str, key: str) -> str:
    return f"$KV.{store_bucket(store)}.{key}"


def session_family(site: str, node: str) -> str:
    """Every key of one agent's session in a store (its record and expiries of it)."""
    return f"sess.{site}.{node}.>"


def session_key(site: str, node: str) -> str:
    """The agent's own session record in a store (only the agent writes it)."""
    return f"sess.{site}.{node}.live"


def expiry_key(site: str, node: str, by_site: str, by_node: str) -> str:
    """A contender's expiry of ``site/node``'s session (only the contender writes it)."""
    return f"sess.{site}.{node}.expired.{by_site}.{by_node}"


def lease_family(app: str) -> str:
    """Every claim of a stateful application's lease."""
    return f"lease.{app}.>"


def lease_claim_key(app: str, site: str, node: str) -> str:
    return f"lease.{app}.{site}.{node}"


def slot_family(app: str, site: str) -> str:
    """Every claim of a stateless application's slot at ``site``."""
    return f"slot.{app}.{site}.>"


def slot_claim_key(app: str, site: str, node: str) -> str:
    return f"slot.{app}.{site}.{node}"


# --- subjects ------------------------------------------------------------------------------
def event_subject(site: str, node: str, event: str) -> str:
    return f"harmony.events.{site}.{node}.{event}"


def audit_subject(user: str, verb: str) -> str:
    return f"harmony.audit.{user}.{verb}"


def status_subject(site: str, node: str) -> str:
    return f"harmony.status.{site}.{node}"


def agent_cmd_subject(site: str, node: str, verb: str) -> str:
    return f"harmony.cmd.{site}.{node}.{verb}"


def app_cmd_subject(name: str, verb: str) -> str:
    return f"harmony.cmd.app.{name}.{verb}"


INSTANCES_SUBJECTS = "harmony.instances.>"


def instances_subject(site: str, node: str) -> str:
    """Core subject: SplitBrainAllowed instance gossip (heard at once after a heal)."""
    return f"harmony.instances.{site}.{node}"


def inbox_prefix(site: str, node: str) -> str:
    """The agent's private inbox prefix (its permissions allow only this one)."""
    return f"_INBOX_{site}_{node}"
