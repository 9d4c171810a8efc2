"""Helpers for lease tests: in-process contenders and the whole-history overlap checker.

Every contender has its own NATS connection, session and LeaseManager, exactly like an agent.
Validity intervals are recorded on CLOCK_MONOTONIC, which all processes on this machine share
(even across network namespaces), so intervals from different processes can be compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import nats
from nats.aio.client import Client

from mesh.bootstrap import Buckets, ensure_mesh
from mesh.leases import LeaseManager, cancel_and_wait
from mesh.names import agent_key
from mesh.session import Session


@dataclass(frozen=True)
class Interval:
    """[start, end] during which ``holder`` believed it held ``lease`` with ``token``."""

    lease: str
    holder: str
    token: int
    start: float
    end: float


def check_history(intervals: Iterable[Interval]) -> int:
    """Fail if two intervals of one lease overlap, or tokens do not increase with time.

    Checks the whole history, not a sample. Returns the number of intervals checked.
    """
    by_lease: dict[str, list[Interval]] = {}
    count = 0
    for iv in intervals:
        assert iv.start <= iv.end, f"negative interval {iv}"
        by_lease.setdefault(iv.lease, []).append(iv)
        count += 1
    for lease, ivs in by_lease.items():
        ivs.sort(key=lambda i: (i.start, i.token))
        for prev, cur in itertools.pairwise(ivs):
            assert cur.start >= prev.end, (
                f"{lease}: {cur.holder} (token {cur.token}) started at {cur.start:.4f} before "
                f"{prev.holder} (token {prev.token}) stopped believing at {prev.end:.4f}"
            )
            assert cur.token > prev.token, f"{lease}: fencing token went {prev.token}->{cur.token}"
    return count


class Contender:
    """One agent-like participant: connection, session (renewed) and lease manager."""

    def __init__(
        self, urls: list[str], site: str, node: str, *, ttl: float, margin: float, step: float
    ) -> None:
        self.urls = urls
        self.site = site
        self.node = node
        self.id = f"{site}/{node}"
        self.ttl = ttl
        self.margin = margin
        self.step = step
        self.nc: Client | None = None
        self.buckets: Buckets | None = None
        self.session: Session | None = None
        self.manager: LeaseManager | None = None
        self._renewer: asyncio.Task[None] | None = None
        self.closed_intervals: list[Interval] = []
        self.acquired_at: dict[str, float] = {}

    async def start(self) -> None:
        self.nc = await nats.connect(
            servers=self.urls, reconnect_time_wait=0.2, dont_randomize=True
        )
        js = self.nc.jetstream()
        self.buckets = await ensure_mesh(js, 3)
        self.session = Session(
            self.buckets.state,
            agent_key(self.site, self.node),
            self.id,
            ttl=self.ttl,
            margin=self.margin,
        )
        self.manager = LeaseManager(js, self.session, step=self.step)
        self.manager.on_acquired.append(self._acquired)
        await self.manager.start()
        self._renewer = asyncio.create_task(self.session.run())

    def _acquired(self, name: str, token: int, deadline: float) -> None:
        self.acquired_at[name] = time.monotonic()

    def intervals(self) -> list[Interval]:
        """Closed tenures, plus open ones ending at the current deadline (conservative)."""
        out = list(self.closed_intervals)
        if self.manager is not None:
            out += [
                Interval(t.name, self.id, t.token, t.start, t.end) for t in self.manager.tenures
            ]
            out += [
                Interval(t.name, self.id, t.token, t.start, t.end)
                for t in self.manager.open_tenures()
            ]
        return out

    def want(self, names: Iterable[str], rank: int = 0) -> None:
        assert self.manager is not None
        for name in names:
            self.manager.want(name, f"app.{name}", rank=rank)

    def held(self) -> dict[str, int]:
        return self.manager.held() if self.manager is not None else {}

    async def pause(self) -> None:
        """Stop renewing (a hung agent): validity runs out on its own timer."""
        if self._renewer is not None:
            await cancel_and_wait(self._renewer)
            self._renewer = None

    def resume(self) -> None:
        assert self.session is not None
        if self._renewer is None:
            self._renewer = asyncio.create_task(self.session.run())

    async def kill(self) -> None:
        """Die abruptly: no release, no close; others must wait out the session."""
        await self.pause()
        if self.manager is not None:
            await self.manager.stop()  # records the end of belief: the process is gone
            self.closed_intervals += [
                Interval(t.name, self.id, t.token, t.start, t.end) for t in self.manager.tenures
            ]
            self.manager = None
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None
