"""The lease manager's vocabulary: what it needs of the session, what it reports (tenures,
statuses) and its own record of each lease it wants or holds.

Kept apart from ``mesh.leases`` so that the manager's I/O part (``mesh.lease_io``) and its
decision loop share these types without importing each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh.session import SessionView


class SessionSource(Protocol):
    """What the lease manager needs of the session (``SessionThread`` in the agent)."""

    @property
    def agent(self) -> str: ...

    def view(self) -> SessionView: ...

    def subscribe(self, cb: Callable[[SessionView], None]) -> None:
        """``cb`` may run on another thread."""
        ...

    def anchor(self, store: str, epoch: str) -> None: ...


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel until done: on Python 3.11 ``asyncio.wait_for`` can swallow a cancellation."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class Tenure:
    """One holding of one lease, as this manager believed it (CLOCK_BOOTTIME)."""

    name: str
    term: int
    start: float
    end: float
    why: str


@dataclass(frozen=True)
class LeaseStatus:
    name: str
    rank: int
    held: bool
    term: int | None
    holder: str | None
    deadline: float | None
    decision: str
    support: tuple[str, ...] = ()


@dataclass
class WantedLease:
    name: str
    key: str
    family: str
    rank: int
    since: float


@dataclass
class HeldLease:
    term: int
    start: float
    claims: dict[str, tuple[int, str]] = field(default_factory=dict)
    """store -> (sequence of our claim, the epoch it names)."""
    _key: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)

    def support(self) -> dict[str, str]:
        return {b: epoch for b, (_, epoch) in self.claims.items()}

    def key(self) -> tuple[tuple[str, str], ...]:
        """The support as a hashable value: leases claimed with the same epochs share
        their deadline (usually all of them), so it is computed once per view."""
        if self._key is None:
            self._key = tuple(sorted(self.support().items()))
        return self._key

    def changed(self) -> None:
        """``claims`` was modified."""
        self._key = None
