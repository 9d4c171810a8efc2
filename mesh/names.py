"""The NATS names of CONTRACT section 7, in one place so no subject is spelled twice."""

from __future__ import annotations

STATE_BUCKET = "harmony-state"
LEASES_BUCKET = "harmony-leases"
TRUST_BUCKET = "harmony-trust"
EVENTS_STREAM = "harmony-events"
EVENTS_SUBJECTS = "harmony.events.>"


def agent_key(site: str, node: str) -> str:
    """Heartbeat and session key of one agent in ``harmony-state``."""
    return f"agent.{site}.{node}"


def app_key(name: str) -> str:
    """Application spec in ``harmony-state``; stateful lease in ``harmony-leases``."""
    return f"app.{name}"


def slot_key(name: str, site: str) -> str:
    """Stateless per-site slot lease in ``harmony-leases``."""
    return f"app.{name}.{site}"


def trust_key(site: str) -> str:
    return f"ca.{site}"


def event_subject(site: str, node: str, event: str) -> str:
    return f"harmony.events.{site}.{node}.{event}"


def status_subject(site: str, node: str) -> str:
    return f"harmony.status.{site}.{node}"


def agent_cmd_subject(site: str, node: str, verb: str) -> str:
    return f"harmony.cmd.{site}.{node}.{verb}"


def app_cmd_subject(name: str, verb: str) -> str:
    return f"harmony.cmd.app.{name}.{verb}"
