"""The Score/Interpret vocabulary shared by every shipped Score.

Interprets return ``Outcome`` and ``Observation`` values instead of raising: the agent's
control loop decides what a failure means (retry, fence, report) and must never be torn down
by a workload's bad day.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
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
    """

    at: float
    follows_session: bool = False


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
