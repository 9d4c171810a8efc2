"""Immutable facts one control-loop cycle decides over, and the decision it returns.

Everything here is pure data: the snapshot is built by thin I/O code (``runner.py``) and
handed to ``decide.decide``, which is a plain function a unit test can call with a fake
clock. Times are ``time.monotonic()`` seconds of the deciding agent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class InstanceState(enum.StrEnum):
    """CONTRACT section 6: the ``state`` of one instance in ``status``."""

    RUNNING = "running"
    STANDBY = "standby"
    STOPPED = "stopped"
    FENCED = "fenced"
    FAILED = "failed"


class Run(enum.StrEnum):
    """What the decision does to the local workload."""

    START = "start"
    """Promote, then apply with the lease's fencing token (and deadline under CP)."""
    STOP = "stop"
    """Demote/stop; idempotent."""
    KEEP = "keep"
    """Leave it as it is (running or not)."""


class Policy(enum.StrEnum):
    KEEP_NEWEST = "keep-newest"
    KEEP_OLDEST = "keep-oldest"


@dataclass(frozen=True, slots=True)
class LeaseView:
    """This agent's view of the lease (``app.<name>`` or its site slot)."""

    held: bool = False
    token: int | None = None
    deadline: float = float("-inf")
    """Monotonic instant the holder must be stopped by (session validity)."""
    holder: str | None = None
    """Agent id holding it as last read; may be stale, informational only."""

    def valid(self, now: float) -> bool:
        return self.held and self.token is not None and now < self.deadline


@dataclass(frozen=True, slots=True)
class WorkloadView:
    running: bool = False
    token: int | None = None
    """Fencing token the running instance was started with."""
    failed: bool = False
    reason: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class PeerInstance:
    """Another agent's instance of the same application, from its (fresh) heartbeat."""

    agent: str
    site: str
    state: str
    token: int | None

    @property
    def running(self) -> bool:
        return self.state == InstanceState.RUNNING


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    agent: str
    site: str
    present: bool
    """The Application exists in the mesh."""
    eligible: bool
    """It exists and ``placement.sites`` includes this agent's site."""
    consistent: bool
    """AbsoluteConsistency (True) or SplitBrainAllowed (False)."""
    policy: Policy = Policy.KEEP_NEWEST
    lease: LeaseView = field(default_factory=LeaseView)
    workload: WorkloadView = field(default_factory=WorkloadView)
    failures: int = 0
    max_failures: int = 3
    cooldown_until: float = float("-inf")
    """After giving up (max failures) this agent does not want the lease until then."""
    backoff_until: float = float("-inf")
    """A failed start is not retried before this instant."""
    fenced: bool = False
    drained: bool = False
    peers: tuple[PeerInstance, ...] = ()
    """Fresh instances of this application on other agents (same site for stateless)."""


@dataclass(frozen=True, slots=True)
class Decision:
    want: bool
    """Contend for the lease (idempotent registration with the lease manager)."""
    run: Run
    release: bool = False
    """Give the lease up after the workload is stopped."""
    handover_to: str | None = None
    """Hand the lease to this agent (after stopping) instead of releasing it."""
    state: InstanceState = InstanceState.STANDBY
    event: str | None = None
    """Event name published when this decision changes something."""
    sentence: str = ""
    give_up: bool = False
    """Max failures reached: start the cooldown."""
