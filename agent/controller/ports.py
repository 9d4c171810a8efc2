"""What a runner sees of the rest of the agent (``Ports``, ``LeasePort``) and what it says
about its instance (``InstanceReport``).

Kept apart from ``runner.py`` so that the runner's collaborators are visible in one place:
the controller implements ``Ports``, the lease manager ``LeasePort``, and tests give fakes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.application import Application
from agent.controller.model import InstanceState, PeerInstance, Replica
from agent.timing import Timing
from scores.base import ReplicationStatus
from topologies.base import Topology


class LeasePort(Protocol):
    """The lease manager, as a runner sees it (``mesh.leases.LeaseManager``)."""

    def want_lease(self, name: str, *, rank: int = 0) -> None: ...
    def want_slot(self, name: str) -> None: ...
    def wanted(self, name: str) -> bool: ...
    def held(self) -> dict[str, int]: ...
    def deadline(self, name: str) -> float: ...
    def follows_session(self, name: str) -> bool: ...
    def support(self, name: str) -> tuple[tuple[str, str], ...]: ...
    async def release(
        self, name: str, *, to: str | None = None, stop: Callable[[], Awaitable[None]] | None = None
    ) -> bool: ...


class Ports(Protocol):
    """Everything a runner may read or do besides its own workload."""

    agent_id: str
    site: str
    node: str
    stopping: bool
    state_dir: Path
    timing: Timing
    max_failures: int
    topology: Topology
    leases: LeasePort

    def clock(self) -> float: ...
    def app(self, name: str) -> Application | None: ...
    def fenced(self, name: str) -> bool: ...
    def drained(self) -> bool: ...
    def peers(self, name: str, site: str | None) -> tuple[PeerInstance, ...]: ...
    def holder(self, name: str) -> str | None: ...
    def replicas(self, name: str, sites: list[str]) -> tuple[Replica, ...]: ...
    async def poll(self, name: str, term: int) -> None: ...
    async def publish(self, event: str, app: str, token: int | None, **fields: Any) -> None: ...
    def report(self, report: InstanceReport, *, urgent: bool = False) -> None: ...
    def remember(self, app: str, token: int, pid: int | None, stop_timeout: float) -> None: ...
    def forget(self, app: str) -> None: ...


@dataclass(frozen=True)
class InstanceReport:
    """What this agent says about one application (``inst.<app>.<site>.<node>``)."""

    app: str
    state: InstanceState
    token: int | None
    detail: str
    lease_token: int | None
    partitioned: bool
    pid: int | None
    enforced: bool = True
    """The deadline is enforced outside the agent (or no deadline applies)."""
    replication: dict[str, Any] | None = None
    """Replicated Scores: role, running, position, timeline, lag_bytes, detail, host, port,
    name (what a synchronous primary lists), answered (the last poll answered)."""
    error: str | None = None
    """The last start or role change failed with this (cleared by the next success)."""

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "app": self.app,
            "state": self.state.value,
            "token": self.token,
            "detail": self.detail,
            "lease_token": self.lease_token,
            "partitioned": self.partitioned,
            "pid": self.pid,
            "deadline_enforced": self.enforced,
        }
        if self.replication is not None:
            body["replication"] = self.replication
        if self.error is not None:
            body["error"] = self.error
        return body


URGENT_REPLICATION = ("role", "running", "timeline", "host", "port", "name", "answered")
"""Replication fields whose change is written at once; the others (position, lag, detail)
at most every ttl/3, so a busy database does not write the state bucket every second."""


def replication_report(
    status: ReplicationStatus | None, endpoint: dict[str, Any], answered: int | None
) -> dict[str, Any] | None:
    if status is None:
        return None
    return {
        "role": str(status.role) if status.has_data else None,
        "running": status.running,
        "position": status.position,
        "timeline": status.timeline,
        "lag_bytes": status.lag_bytes,
        "detail": status.detail,
        "host": endpoint.get("host"),
        "port": endpoint.get("port"),
        "name": endpoint.get("application_name"),
        "answered": answered,
    }


class StillRunning(RuntimeError):
    """A stop did not finish: the lease is kept (renewed) rather than released over it."""
