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
    # Replicated Scores (``roles.py``): the lease holder runs the primary, others replicas.
    START_PRIMARY = "start-primary"
    """Initialise the first primary, or take a running primary over with the lease's token."""
    PROMOTE = "promote"
    """The local replica becomes the primary, with the lease's token and deadline."""
    START_REPLICA = "start-replica"
    """Copy, rejoin or re-point a replica of ``Plan.primary`` (None: a standby alone)."""
    DEMOTE = "demote"
    """The local primary becomes a replica of ``Plan.primary`` (None: stops until one is
    known)."""
    POLL = "poll"
    """Ask the live replicas how far they reached (answered through gossip)."""


ROLE_ACTIONS = frozenset({Run.START_PRIMARY, Run.PROMOTE, Run.START_REPLICA, Run.DEMOTE})


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
    PROMOTED = "promoted"
    DEMOTED = "demoted"
    FOLLOWING = "following"
    NOT_PROMOTED = "not-promoted"


QUIET_REASONS = frozenset({None, "stopped", "exited", "deadline", "agent-gone"})
"""Workload end reasons that are not failures of the workload."""
CRASH_REASONS = frozenset({"crashed", "spawn-failed"})
FIRST_BACKOFF = 0.5
"""Seconds before a failed start (or role change) is tried again; doubled per failure up to
``MAX_BACKOFF``, and back to this after a success or a give-up: a round of attempts after
the cool-down starts afresh, instead of holding the lease through ever longer backoffs
while another site could run the application."""
MAX_BACKOFF = 30.0


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
    replica: Replica | None = None
    """A replicated Score's replication state (its report's ``replication``)."""

    @property
    def running(self) -> bool:
        return self.state == InstanceState.RUNNING


@dataclass(frozen=True, slots=True)
class Replica:
    """One instance of a replicated application: ours (observed) or a peer's (its report).

    ``at`` orders instances by how much of the history they hold: a higher timeline is a
    later promotion, and along one timeline the position only grows.
    """

    agent: str
    role: str | None
    """``primary`` or ``replica`` (what its data is); None: no data, or unreadable."""
    running: bool
    position: int | None
    timeline: int | None
    lag: int | None = None
    token: int | None = None
    """A primary's fencing token."""
    host: str | None = None
    port: int | None = None
    name: str | None = None
    """What a synchronous primary lists it as (PostgreSQL: ``application_name``)."""
    answered: int | None = None
    """The poll (lease term) this report answers."""
    polling: int | None = None
    """It holds the lease with this term and asks how far the replicas reached: it is about
    to be promoted (replicas point to it already; a promoted server is streamed from at
    once)."""
    live: bool = True
    """Its agent is alive (or gossiped within a ttl); stale reports still count for the
    floor (the furthest position the mesh ever saw)."""

    @property
    def at(self) -> tuple[int, int] | None:
        if self.timeline is None or self.position is None:
            return None
        return (self.timeline, self.position)

    @property
    def has_data(self) -> bool:
        return self.role is not None

    @property
    def serving_primary(self) -> bool:
        return self.role == "primary" and self.running


@dataclass(frozen=True, slots=True)
class Roles:
    """The replicated part of a snapshot (``roles.decide_roles``)."""

    local: Replica
    peers: tuple[Replica, ...] = ()
    """Every other agent's report of this application at a placement site, live or not."""
    following: tuple[str, int] | None = None
    """(agent, token) of the primary the local replica was last pointed at."""
    pointed: str | None = None
    """The lease holder the local replica was pointed at before its promotion."""
    max_lag: int = 1024 * 1024
    held_since: float = float("-inf")
    """When this agent first saw the current lease term held (a promotion's poll counts
    from there)."""
    poll_wait: float = 1.0
    """How long a new holder waits for the live replicas' answers before it decides."""


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
    roles: Roles | None = None
    """Set for a replicated Score: the roles' facts (None: every other Score)."""


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
    primary: Replica | None = None
    """START_REPLICA / DEMOTE: the primary to follow (None: nobody yet)."""
    sync_standbys: tuple[str, ...] | None = None
    """A primary's synchronous replicas (names), set before it starts or as they change."""
