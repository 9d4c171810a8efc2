"""Per-application counters: failovers, handovers, restarts, give-ups, failed control
cycles, and the commands.

Plain dictionaries, incremented where those things happen (one line each in the runner and
the command server) and read by the collector in ``agent.metrics`` at scrape time, which
also emits the label sets of every application at 0 and forgets deleted ones (``prune``).
No prometheus_client here: the command server is imported by code paths that must stay
light, and a dictionary increment costs nothing on the control loop.

Failovers and handovers are counted by the agent that *receives* the lease, so that
``sum by (app)`` over all agents counts each move of an application once, even when the
previous holder is dead and no longer scraped. What the receiver knows: the last other
agent it saw holding the lease (``HolderLog.holder_of`` wraps the lease manager's
``holder_of``, which every runner cycle calls) and, once it acquires, whether that agent's
claim was a handover addressed to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mesh.leases import LeaseManager
    from scores.base import Observation

VERBS = ("failover", "drain", "undrain", "fence", "resume", "ping", "logs")
"""Label values of ``verb`` (``agent.commands.models.Verb``; anything else is ``other``)."""
RESULTS = ("ok", "error")
CRASH_REASONS = frozenset({"crashed", "spawn-failed"})


@dataclass
class AppCounts:
    failovers: int = 0
    handovers: int = 0
    restarts: int = 0
    give_ups: int = 0
    step_failures: int = 0


@dataclass
class _Seen:
    """The last workload observation of one application (restart counting)."""

    restarts: int = 0
    crashed: bool = False


@dataclass
class Tallies:
    apps: dict[str, AppCounts] = field(default_factory=dict)
    commands: dict[tuple[str, str], int] = field(default_factory=dict)
    seen: dict[str, _Seen] = field(default_factory=dict)
    """The last workload observation of each application."""

    def app(self, name: str) -> AppCounts:
        counts = self.apps.get(name)
        if counts is None:
            counts = self.apps[name] = AppCounts()
        return counts

    def prune(self, keep: Iterable[str]) -> None:
        """Forget applications no longer known (deleted): their series disappear."""
        known = set(keep)
        for name in [n for n in self.apps if n not in known]:
            del self.apps[name]
        for name in [n for n in self.seen if n not in known]:
            del self.seen[name]


TALLIES = Tallies()


def gave_up(app: str) -> None:
    """The holder gave the application up here (failures or health probe): cool-down."""
    TALLIES.app(app).give_ups += 1


def step_failed(app: str) -> None:
    """A controller cycle for the application raised (``AppRunner._step_failed``)."""
    TALLIES.app(app).step_failures += 1


def observed(app: str, obs: Observation | None) -> None:
    """One cycle's observation of the workload. A restart is either the Interpret's own
    (its ``restarts`` count went up: a Process restarted after a crash) or the controller's
    (the workload was seen crashed, and is now seen running again without that count
    moving: a ``restart: never`` workload started again under the same lease). The count
    falls back to 0 when a new run starts; that is a new baseline, not a restart."""
    if obs is None:
        return
    seen = TALLIES.seen.get(app)
    running = obs.state.value == "running"
    crashed = obs.state.value == "failed" and obs.reason in CRASH_REASONS
    if seen is not None:
        delta = obs.restarts - seen.restarts
        if delta > 0:
            TALLIES.app(app).restarts += delta
        elif seen.crashed and running:
            TALLIES.app(app).restarts += 1
    TALLIES.seen[app] = _Seen(obs.restarts, crashed)


def command(subject: str, ok: bool) -> None:
    """One reply of the command plane (every request gets exactly one)."""
    verb = subject.rsplit(".", 1)[-1]
    key = (verb if verb in VERBS else "other", "ok" if ok else "error")
    TALLIES.commands[key] = TALLIES.commands.get(key, 0) + 1


class HolderLog:
    """Who held each lease before this agent acquired it (see the module docstring).

    ``holder_of`` is what the controller calls to learn a lease's holder; it records the
    last *other* agent seen holding each lease. ``acquired`` (a lease manager
    ``on_acquired`` callback) then counts a handover when that agent's claim is a handover
    to us, and a failover otherwise (its holder crashed, was cut off, gave up, was drained
    or shut down), and forgets that agent. A lease never seen held by another agent (first
    start, or our own earlier holding) counts as neither. Seeing *ourselves* as holder
    forgets nothing: the cache can show our new claim to a runner cycle before the lease
    manager calls ``acquired``, and forgetting then lost the move.
    """

    def __init__(self, leases: LeaseManager) -> None:
        self.leases = leases
        self.me = leases.agent
        self.site = leases.site
        self.last: dict[str, str] = {}

    def holder_of(self, name: str) -> str | None:
        holder = self.leases.holder_of(name)
        if holder is not None and holder != self.me:
            self.last[name] = holder
        return holder

    def acquired(self, name: str, term: int, deadline: float) -> None:
        previous = self.last.pop(name, None)
        if previous is None:
            return
        app = name.split("@", 1)[0]
        counts = TALLIES.app(app)
        if self._handed_to_us(name, previous):
            counts.handovers += 1
        else:
            counts.failovers += 1

    def _handed_to_us(self, name: str, previous: str) -> bool:
        for state, to in self._claims_of(name, previous):
            if state == "handover" and to in (self.me, self.site):
                return True
        return False

    def _claims_of(self, name: str, agent: str) -> list[tuple[str, str | None]]:
        """(state, to) of ``agent``'s claim on lease ``name`` in every store that has one."""
        from mesh.names import lease_family, slot_family

        app, _, site = name.partition("@")
        family = slot_family(app, site) if site else lease_family(app)
        out: list[tuple[str, str | None]] = []
        for cache in self.leases.caches.values():
            for claim in cache.family(family).claims:
                if claim.agent == agent and claim.record is not None:
                    out.append((claim.record.state.value, claim.record.to))
        return out
