"""The Score/Interpret vocabulary shared by every shipped Score.

Interprets return ``Outcome`` and ``Observation`` values instead of raising: the agent's
control loop decides what a failure means (retry, fence, report) and must never be torn down
by a workload's bad day.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
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
class RunContext:
    """Who runs the workload and until when, handed to ``apply``.

    ``deadline`` is a ``time.monotonic()`` value. CLOCK_MONOTONIC is system-wide on Linux,
    so the guard process of a Process workload can compare it with its own clock.
    """

    app: str
    site: str
    node: str
    fencing_token: int
    state_dir: Path
    deadline: float | None = None

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

    ``enforces_deadline`` tells the agent whether ``extend_deadline`` actually bounds the
    workload's life (Process does, outside the event loop); for the others the agent must
    stop the workload itself before its lease ends.
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

    def extend_deadline(self, monotonic_deadline: float) -> None:
        """Allow the workload to run until ``monotonic_deadline``; cheap, call it often."""
        del monotonic_deadline

    def clear_deadline(self) -> None:
        """Let the workload run without a deadline (SplitBrainAllowed)."""
        return None

    async def close(self) -> None:
        """Release resources (connections) without touching the workload."""
        return None
