"""Other agents' instances: their reports (``inst.<app>.<site>.<node>``) and their gossip.

A SplitBrainAllowed holder cut off from the mesh keeps its workload running without a
lease; after the partition heals, both sides must learn of the duplicate to reconcile it.
Reports are written on change only (never renewed), so a report is trusted while its
agent is alive (its session is seen renewing, ``alive``), or while a gossip message on
``harmony.instances.<site>.<node>`` from that agent is younger than a ttl (gossip crosses a
healed link at once, before the replicated state bucket has caught up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from agent.controller.model import PeerInstance, Replica
from mesh import codec


@dataclass(frozen=True)
class _Report:
    instance: PeerInstance
    seen: float
    gossip: bool


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_replica(agent: str, token: int | None, data: Any) -> Replica | None:
    """A report's ``replication`` block (see ``InstanceReport``); None when absent."""
    if not isinstance(data, dict):
        return None
    role = data.get("role")
    return Replica(
        agent=agent,
        role=role if role in ("primary", "replica") else None,
        running=data.get("running") is True,
        position=_int(data.get("position")),
        timeline=_int(data.get("timeline")),
        lag=_int(data.get("lag_bytes")),
        token=token,
        host=_str(data.get("host")),
        port=_int(data.get("port")),
        name=_str(data.get("name")),
        answered=_int(data.get("answered")),
    )


def parse_instance(agent: str, site: str, data: dict[str, Any]) -> PeerInstance | None:
    token = _int(data.get("token"))
    state = data.get("state")
    if not isinstance(state, str):
        return None
    return PeerInstance(
        agent=agent,
        site=site,
        state=state,
        token=token,
        replica=parse_replica(agent, token, data.get("replication")),
    )


class PeerTable:
    def __init__(
        self,
        me: str,
        ttl: float,
        clock: Callable[[], float],
        alive: Callable[[str], bool],
    ) -> None:
        self.me = me
        self.ttl = ttl
        self.clock = clock
        self.alive = alive
        self._reports: dict[str, dict[str, _Report]] = {}
        """app -> agent -> the newest report or gossip (by app: every runner asks for its
        own application on every step, and a scan of every report was O(applications))."""
        self._gossip_seen: dict[str, float] = {}
        self._polls: dict[tuple[str, str], tuple[int, float]] = {}
        """(app, agent) -> (term, when): that agent holds the lease and polls."""

    def feed_report(self, app: str, agent: str, value: bytes | None) -> bool:
        """An ``inst.*`` key changed; True if it concerns another agent."""
        if agent == self.me:
            return False
        data = codec.load_object(value, kind="instance", key=f"inst.{app}.{agent}")
        inst = parse_instance(agent, agent.split("/", 1)[0], data) if data is not None else None
        reports = self._reports.setdefault(app, {})
        old = reports.get(agent)
        if inst is None:
            reports.pop(agent, None)
        elif old is None or not old.gossip or self.clock() - old.seen >= self.ttl:
            reports[agent] = _Report(inst, self.clock(), False)
        return True

    def feed_gossip(self, value: bytes) -> tuple[str | None, set[str]]:
        """A gossip message: (its agent, the apps it mentions)."""
        data = codec.load_object(value, kind="gossip")
        if data is None:
            return None, set()
        agent = codec.text(data, "agent")
        if "/" not in agent or agent == self.me:
            return None, set()
        site = agent.split("/", 1)[0]
        now = self.clock()
        self._gossip_seen[agent] = now
        apps: set[str] = set()
        items = data.get("instances")
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("app"), str):
                continue
            inst = parse_instance(agent, site, item)
            if inst is not None:
                self._reports.setdefault(item["app"], {})[agent] = _Report(inst, now, True)
                apps.add(item["app"])
        return agent, apps

    def knows(self, agent: str) -> bool:
        """We heard gossip from ``agent`` within a ttl (False: new, or back from silence)."""
        seen = self._gossip_seen.get(agent)
        return seen is not None and self.clock() - seen < self.ttl

    def _live(self, report: _Report, now: float) -> bool:
        if report.gossip and now - report.seen < self.ttl:
            return True
        return self.alive(report.instance.agent)

    def instances(self, app: str, *, site: str | None = None) -> tuple[PeerInstance, ...]:
        now = self.clock()
        return tuple(
            r.instance
            for r in self._reports.get(app, {}).values()
            if (site is None or r.instance.site == site) and self._live(r, now)
        )

    def feed_poll(self, app: str, agent: str, term: int) -> None:
        """``agent`` asked how far our replicas reached, for lease ``term`` of ``app``."""
        self._polls[(app, agent)] = (term, self.clock())

    def replicas(self, app: str, sites: Iterable[str]) -> tuple[Replica, ...]:
        """Every report of a replicated ``app`` from agents at ``sites``, live or stale
        (``Replica.live`` says which): stale ones still count for the floor."""
        now, wanted = self.clock(), set(sites)
        out = []
        for _, r in sorted(self._reports.get(app, {}).items()):
            inst = r.instance
            if inst.site in wanted and inst.replica is not None:
                poll = self._polls.get((app, inst.agent))
                polling = poll[0] if poll is not None and now - poll[1] < self.ttl else None
                out.append(replace(inst.replica, live=self._live(r, now), polling=polling))
        return tuple(out)

    def apps_of(self, agent: str) -> set[str]:
        return {app for app, reports in self._reports.items() if agent in reports}
