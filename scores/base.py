"""The Score/Interpret vocabulary shared by every shipped Score.

Interprets return ``Outcome`` and ``Observation`` values instead of raising: the agent's
control loop decides what a failure means (retry, fence, report) and must never be torn down
by a workload's bad day.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Score(BaseModel):
    """Desired state, as written in an Application's ``score:`` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    required_capabilities: ClassVar[frozenset[type]] = frozenset()
    """Capabilities (``topologies.capabilities`` protocols) the Interpret needs."""


class WorkloadState(enum.StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an action did. ``changed`` is False when the world already was as asked."""

    ok: bool
    message: str
    changed: bool = False

    @classmethod
    def done(cls, message: str, *, changed: bool = True) -> Outcome:
        return cls(True, message, changed)

    @classmethod
    def failed(cls, message: str) -> Outcome:
        return cls(False, message, False)


@dataclass(frozen=True, slots=True)
class Observation:
    """What is running now. ``reason`` is a stable token (``deadline``, ``crashed``...)."""

    state: WorkloadState
    detail: str = ""
    pids: tuple[int, ...] = ()
    reason: str | None = None
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Deadline:
    """Until when a workload may run: a CLOCK_BOOTTIME instant (system-wide, and it keeps
    counting through suspend, so the fence process compares it with its own clock).

    ``follows_session``: the agent's session thread moves this deadline on every renewal
    without the main loop (the fence follows it); otherwise it is fixed until changed.

    ``support``: the lease's claims as (store, epoch) pairs. When the lease does not follow
    the session (claimed in fewer stores than the session is anchored in, until repaired),
    a fence that reads the renewals itself can still follow *this* support's validity
    without the main loop; otherwise a busy loop would leave it a stale fixed deadline.
    """

    at: float
    follows_session: bool = False
    support: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RunContext:
    """Who runs the workload and until when, handed to ``apply``."""

    app: str
    site: str
    node: str
    fencing_token: int
    state_dir: Path
    deadline: Deadline | None = None
    """None: no deadline (SplitBrainAllowed keeps serving through a partition)."""

    @property
    def workload_dir(self) -> Path:
        return self.state_dir / "workloads"

    def harmony_env(self) -> dict[str, str]:
        """CONTRACT section 4: the variables every workload is started with."""
        return {
            "HARMONY_APP": self.app,
            "HARMONY_SITE": self.site,
            "HARMONY_NODE": self.node,
            "HARMONY_FENCING_TOKEN": str(self.fencing_token),
        }


class Interpret(ABC):
    """How one Score is realised on one Topology; every method is idempotent.

    ``enforces_deadline`` tells the agent whether ``set_deadline`` actually bounds the
    workload's life outside the agent's event loop (Process does, through the fence); for
    the others the agent stops the workload itself before its lease ends, which a hung
    agent cannot do (``check`` and ``status`` say so).
    """

    enforces_deadline: ClassVar[bool] = False
    reports_changes: ClassVar[bool] = False
    """``watch`` reports every change of ``observe()`` (Process: exits come as events), so
    the agent need not poll it; the others are observed every control interval."""
    follows_session_itself: ClassVar[bool] = False
    """A ``Deadline`` with ``follows_session`` is kept current without the agent (Process:
    the fence reads every session renewal), so the agent may skip ``set_deadline`` on
    renewals. False (the default): ``set_deadline`` is called on every renewal, as the
    PostgreSQL watchdog and the systemd timer need to be pushed forward."""

    @abstractmethod
    async def apply(self, ctx: RunContext) -> Outcome:
        """Ensure the workload runs."""

    @abstractmethod
    async def stop(self) -> Outcome:
        """Ensure the workload does not run."""

    @abstractmethod
    async def observe(self) -> Observation: ...

    async def promote(self, ctx: RunContext) -> Outcome:
        """Turn a standby into the active instance; by default the same as ``apply``."""
        return await self.apply(ctx)

    async def demote(self) -> Outcome:
        """Turn the active instance into a standby; by default the same as ``stop``."""
        return await self.stop()

    def watch(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` when the workload's state changes by itself (an exit). Interprets
        that cannot tell (systemd, Kubernetes) do nothing: the agent polls them instead."""
        del cb

    def set_deadline(self, deadline: Deadline | None) -> None:
        """Allow the workload to run until ``deadline`` (None: no deadline); cheap, the agent
        calls it whenever the lease's validity moves."""
        del deadline

    async def close(self) -> None:
        """Release resources (connections) without touching the workload."""
        return None


# ------------------------------------------------------------------ roles (replicated Scores)
# SPEC-v2 / issue 13: a replicated Score runs its primary where the application's lease is held
# and a replica on every other placement site. The agent's controller decides the roles
# (primary = the lease holder; the most up-to-date replica is the one promoted) and drives the
# Interpret through the methods below; the Interpret only knows how to make one instance play
# the role it is given (agent/controller/roles.py, docs/failover.md).


class Role(enum.StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(frozen=True)
class PrimaryInfo:
    """Where the current primary is: what a replica needs to follow it.

    Built by the controller from the primary's ``endpoint()`` (published in its instance
    report) and its lease; ``token`` is the primary's fencing token. ``extra["pending"]``:
    the lease holder that is about to be promoted (not writable yet): a running replica
    points to it without checking anything against it (a later call with the promoted
    primary checks).
    """

    site: str
    node: str
    host: str
    port: int
    token: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicationStatus:
    """One instance's replication state, as the controller compares candidates.

    ``position`` increases monotonically along a timeline (PostgreSQL: an LSN as an int). A
    running primary reports what it has written; a running replica what a promotion would
    reach (the greater of what it received and what it replayed); a stopped instance a lower
    bound read from its files (None when unknown). ``lag_bytes`` is how far a replica is
    behind the primary it follows (0 on a primary, None when unknown). ``running`` and
    ``has_data`` say whether the instance runs and whether it has data at all (a replica
    that was never copied has none).
    """

    role: Role
    position: int | None
    timeline: int | None
    lag_bytes: int | None
    detail: str
    running: bool = True
    has_data: bool = True


REPLICATION_EXTRA = "replication"
"""``Observation.extra`` key: a running replicated instance's ``ReplicationStatus`` (saves
the controller a second query per cycle)."""


class ReplicatedInterpret(Interpret):
    """A Score whose replicas run on every other placement site.

    ``apply`` (what a non-replicated controller would call on the lease holder) means
    ``start_primary``; ``demote()`` without an argument stops being a primary without
    following anyone yet. Every method is idempotent and returns a value (never raises).
    """

    role_timeout: float = 600.0
    """Longest a role change (``start_*``, ``promote``, ``demote``) may take, copies
    included; the controller bounds each call by it (the lease deadline is the Interpret's
    own business: ``enforces_deadline``)."""

    @abstractmethod
    async def start_primary(self, ctx: RunContext) -> Outcome:
        """First primary (initialise) or restart as primary; never turns a replica into one."""

    @abstractmethod
    async def start_replica(self, ctx: RunContext, primary: PrimaryInfo | None) -> Outcome:
        """Create (base backup), rejoin (rewind) or re-point a replica of ``primary``.

        ``primary`` None: start the local data as a standby that follows nobody yet (it
        replays what it has, so its position can be compared); without data, do nothing."""

    @abstractmethod
    async def promote(self, ctx: RunContext) -> Outcome:
        """Replica -> primary, recording ``ctx.fencing_token``; honours ``ctx.deadline``."""

    @abstractmethod
    async def demote(self, primary: PrimaryInfo | None = None) -> Outcome:
        """Primary -> replica of ``primary`` (rewind, else a fresh copy); None: stop only."""

    @abstractmethod
    async def status(self) -> ReplicationStatus: ...

    @abstractmethod
    def endpoint(self) -> dict[str, Any]:
        """What replicas and clients need to reach this instance (host, port, ...)."""

    def attach(self, ctx: RunContext) -> None:
        """Learn app, site and paths without acting: an agent that restarted calls this
        before ``status()`` or ``demote()`` when it has not started anything yet."""
        del ctx

    async def set_sync_standbys(self, names: Sequence[str]) -> Outcome:
        """The replicas (``endpoint()["application_name"]``) a synchronous primary waits for;
        called by the controller whenever the set of replicas changes."""
        del names
        return Outcome.done("this Score names no synchronous replicas", changed=False)

    async def apply(self, ctx: RunContext) -> Outcome:
        return await self.start_primary(ctx)
