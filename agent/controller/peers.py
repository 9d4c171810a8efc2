"""Other agents' instances: their reports (``inst.<app>.<site>.<node>``) and their gossip.

A SplitBrainAllowed holder cut off from the mesh keeps its workload running without a
lease; after the partition heals, both sides must learn of the duplicate to reconcile it.
Reports are written on change only (never renewed), so a report is trusted while its
agent is alive (its session is seen renewing, ``alive``), or while a gossip message on
``harmony.instances.<site>.<node>`` from that agent is younger than a ttl (gossip crosses a
healed link at once, before the replicated state bucket has caught up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.controller.model import PeerInstance
from mesh import codec


@dataclass(frozen=True)
class _Report:
    instance: PeerInstance
    seen: float
    gossip: bool


def parse_instance(agent: str, site: str, data: dict[str, Any]) -> PeerInstance | None:
    token = data.get("token")
    state = data.get("state")
    if not isinstance(state, str):
        return None
    return PeerInstance(
        agent=agent,
        site=site,
        state=state,
        token=token if isinstance(token, int) and not isinstance(token, bool) else None,
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
        self._reports: dict[tuple[str, str], _Report] = {}
        """(app, agent) -> the newest report or gossip."""
        self._gossip_seen: dict[str, float] = {}

    def feed_report(self, app: str, agent: str, value: bytes | None) -> bool:
        """An ``inst.*`` key changed; True if it concerns another agent."""
        if agent == self.me:
            return False
        key = (app, agent)
        data = codec.load_object(value, kind="instance", key=f"inst.{app}.{agent}")
        inst = parse_instance(agent, agent.split("/", 1)[0], data) if data is not None else None
        old = self._reports.get(key)
        if inst is None:
            self._reports.pop(key, None)
        elif old is None or not old.gossip or self.clock() - old.seen >= self.ttl:
            self._reports[key] = _Report(inst, self.clock(), False)
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
                self._reports[(item["app"], agent)] = _Report(inst, now, True)
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
            for (a, _), r in self._reports.items()
            if a == app and (site is None or r.instance.site == site) and self._live(r, now)
        )

    def apps_of(self, agent: str) -> set[str]:
        return {app for (app, a) in self._reports if a == agent}
