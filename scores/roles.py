"""The Role API for replicated Scores (SPEC-v2, issue 13).

A *replicated* Score runs its primary where the application's lease is held and a replica on
every other placement site. The agent's controller decides the roles (primary = the lease
holder) and drives the Interpret through the methods below; the Interpret only knows how to
make one instance play the role it is given.

These dataclasses live here until the lead moves them into ``scores/base.py``; they are
written so that the move is a cut-and-paste (nothing else in this module).
"""

from __future__ import annotations

import enum
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scores.base import Interpret, Outcome, RunContext


class Role(enum.StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(frozen=True)
class PrimaryInfo:
    """Where the current primary is: what a replica needs to follow it.

    Built by the controller from the primary's ``endpoint()`` (published through the mesh)
    and the holder's lease; ``token`` is the holder's fencing token.
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

    ``position`` is a monotonically increasing replication position (PostgreSQL: the LSN as an
    int; a primary reports what it has written, a replica what it has replayed); ``lag_bytes``
    how far a replica is behind the primary it follows (0 on a primary, None when unknown).
    """

    role: Role
    position: int | None
    timeline: int | None
    lag_bytes: int | None
    detail: str


class ReplicatedInterpret(Interpret):
    """A Score whose replicas run on every other placement site.

    ``apply`` (what today's controller calls on the lease holder) means ``start_primary``;
    ``demote()`` without an argument stops being a primary without following anyone yet.
    """

    @abstractmethod
    async def start_primary(self, ctx: RunContext) -> Outcome:
        """First primary (initialise) or restart as primary; never turns a replica into one."""

    @abstractmethod
    async def start_replica(self, ctx: RunContext, primary: PrimaryInfo) -> Outcome:
        """Create (base backup) or rejoin (rewind) or re-point a replica of ``primary``."""

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
