"""Other agents' instances, read from their heartbeats (``agent.<site>.<node>``).

Each agent publishes ``instances: [{app, state, token, ...}]`` in its heartbeat. A
SplitBrainAllowed holder cut off from the mesh keeps its workload running without a lease;
after the partition heals its heartbeats reach everyone again, and this table is how both
sides learn of the duplicate and reconcile it. Heartbeats are renewed every ttl/3; one not
seen to change for a ttl (on *our* clock) is stale and its instances are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from agent.controller.model import PeerInstance


@dataclass(frozen=True)
class PeerBeat:
    agent: str
    site: str
    alive: bool
    seen: float
    instances: tuple[tuple[str, PeerInstance], ...]


def parse_heartbeat(value: bytes | None) -> tuple[str, str, bool, list[tuple[str, PeerInstance]]]:
    """(agent, site, alive, [(app, instance)]); raises ValueError on garbage."""
    if not value:
        raise ValueError("empty heartbeat")
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("heartbeat is not an object")
    agent = str(data["agent"])
    site = str(data.get("site") or agent.split("/", 1)[0])
    alive = str(data.get("state", "alive")) == "alive"
    out: list[tuple[str, PeerInstance]] = []
    for item in data.get("instances") or []:
        if not isinstance(item, dict) or "app" not in item:
            continue
        token = item.get("token")
        out.append(
            (
                str(item["app"]),
                PeerInstance(
                    agent=agent,
                    site=site,
                    state=str(item.get("state", "")),
                    token=int(token) if isinstance(token, int) else None,
                ),
            )
        )
    return agent, site, alive, out


class PeerTable:
    def __init__(self, me: str, ttl: float, clock: Callable[[], float]) -> None:
        self.me = me
        self.ttl = ttl
        self.clock = clock
        self._beats: dict[str, PeerBeat] = {}

    def feed(self, key: str, value: bytes | None) -> set[str]:
        """Record a heartbeat change; return the apps it mentions (now or before)."""
        old = self._beats.get(key)
        apps = {a for a, _ in old.instances} if old else set()
        if value is None:
            self._beats.pop(key, None)
            return apps
        try:
            agent, site, alive, insts = parse_heartbeat(value)
        except (ValueError, KeyError, TypeError):
            return apps
        if agent == self.me:
            return apps
        self._beats[key] = PeerBeat(agent, site, alive, self.clock(), tuple(insts))
        return apps | {a for a, _ in insts}

    def knows(self, key: str) -> bool:
        """We hold a fresh report under ``key`` (False: new peer, or one back from silence)."""
        beat = self._beats.get(key)
        return beat is not None and self.fresh(beat, self.clock())

    def fresh(self, beat: PeerBeat, now: float) -> bool:
        return beat.alive and now - beat.seen < self.ttl

    def latest(self) -> list[PeerBeat]:
        """Per agent, its most recently received fresh report (heartbeat or announcement)."""
        now = self.clock()
        best: dict[str, PeerBeat] = {}
        for beat in self._beats.values():
            if self.fresh(beat, now) and (
                beat.agent not in best or beat.seen > best[beat.agent].seen
            ):
                best[beat.agent] = beat
        return list(best.values())

    def instances(self, app: str, *, site: str | None = None) -> tuple[PeerInstance, ...]:
        out: list[PeerInstance] = []
        for beat in self.latest():
            if site is None or beat.site == site:
                out.extend(inst for name, inst in beat.instances if name == app)
        return tuple(out)

    def live_agents(self, site: str | None = None) -> list[str]:
        return sorted(b.agent for b in self.latest() if site is None or b.site == site)
