"""The vocabulary of the control loop: the facts one cycle decides over, and its plan.

Everything here is pure data. The runner (``runner.py``) builds a ``Snapshot`` from its
ports, ``decide.decide`` turns it into a ``Plan``, and the runner carries the plan out.
Times are CLOCK_BOOTTIME seconds of the deciding agent.
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
    """What the plan does to the local workload."""

    START = "start"
    """Promote, then apply with the lease's fencing token and deadline."""
    STOP = "stop"
    KEEP = "keep"


class Policy(enum.StrEnum):
    KEEP_NEWEST = "keep-newest"
    KEEP_OLDEST = "keep-oldest"


class Event(enum.StrEnum):
    """Events published to ``harmony-events`` when a plan changes something."""

    STARTED = "started"
    STOPPED = "stopped"
    FENCED = "fenced"
    DRAINED = "drained"
    GAVE_UP = "gave-up"
    RECONCILED = "reconciled"
    HANDOVER = "handover"
    RESTARTING = "restarting"
    LEASE_LOST = "lease-lost"
    PARTITIONED = "partitioned"
    START_FAILED = "start-failed"
    LEFTOVER_STOPPED = "leftover-stopped"


QUIET_REASONS = frozenset({None, "stopped", "exited", "deadline", "agent-gone"})
"""Workload end reasons that are not failures of the workload."""
CRASH_REASONS = frozenset({"crashed", "spawn-failed"})


@dataclass(frozen=True, slots=True)
class LeaseView:
    """This agent's view of the lease (stateful) or of its site's slot (stateless)."""

    held: bool = False
    token: int | None = None
    deadline: float = float("-inf")
    """Instant the holder must be stopped by (its validity)."""
    holder: str | None = None
    """Agent id holding it as last observed; informational only."""

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
    start_failed: str | None = None
    """The last start attempt failed with this message (cleared by a successful start)."""


@dataclass(frozen=True, slots=True)
class PeerInstance:
    """Another agent's instance of the same application, from its live report."""

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
    wanted: bool = False
    """We are contending for the lease now."""
    workload: WorkloadView = field(default_factory=WorkloadView)
    failures: int = 0
    max_failures: int = 3
    cooldown_until: float = float("-inf")
    backoff_until: float = float("-inf")
    fenced: bool = False
    drained: bool = False
    peers: tuple[PeerInstance, ...] = ()
    """Live instances of this application on other agents (same site for stateless)."""
    unhealthy: str | None = None
    """The health probe crossed its failure threshold with this sentence."""


class Release(enum.StrEnum):
    NONE = "none"
    RELEASE = "release"
    HANDOVER = "handover"


@dataclass(frozen=True, slots=True)
class Plan:
    """One cycle's decision: what to do, and the one sentence that says why."""

    state: InstanceState
    sentence: str
    want: bool
    """Contend for the lease (the runner registers or unregisters accordingly)."""
    run: Run = Run.KEEP
    release: Release = Release.NONE
    handover_to: str | None = None
    event: Event | None = None
    """Published when carrying the plan out changed something."""
    event_token: int | None = None
    """The token the event reports: the new instance's for a start, the stopped one's for a
    stop."""
    partitioned: bool = False
    """Serving without a valid lease (SplitBrainAllowed through a partition)."""
    give_up: bool = False
    """Start the cool-down: max failures reached, or the health probe failed."""
    deadline: bool = False
    """The running workload is bound by the lease deadline (AbsoluteConsistency)."""
    done: bool = False
    """Nothing runs, nothing is held or wanted, the application is gone: the runner ends."""
    retry_at: float | None = None
    """Decide again at this instant even if nothing changes (backoff, cool-down end)."""
