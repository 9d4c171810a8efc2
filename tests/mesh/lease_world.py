"""Helpers for lease tests: in-process contenders and the whole-history overlap checker.

Every contender has its own NATS connections, session thread and LeaseManager, exactly like
an agent. Validity intervals are recorded on CLOCK_BOOTTIME, which all processes on this
machine share (even across network namespaces), so intervals can be compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from mesh.bootstrap import Mesh, ensure_mesh, ensure_store
from mesh.clock import boottime
from mesh.leases import LeaseManager
from mesh.names import STATE_BUCKET, store_bucket
from mesh.session import SessionThread
from tests.harness.nats import writable


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


async def make_mesh(urls: list[str], stores: list[str], replicas: int = 3) -> Mesh:
    """Create the mesh; a cluster that has just started may still be electing its
    JetStream meta leader (requests time out meanwhile), so keep asking for a minute.
    Then wait until its buckets take writes through every server (``writable``)."""
    deadline = time.monotonic() + 60
    while True:
        nc = await nats.connect(servers=urls)
        try:
            mesh = await ensure_mesh(nc.jetstream(timeout=10), replicas, stores=stores)
            break
        except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.APIError):
            if time.monotonic() > deadline:
                raise
        finally:
            await nc.close()
        await asyncio.sleep(0.5)
    await writable(urls, [STATE_BUCKET, *(store_bucket(name) for name in stores)])
    return mesh


@dataclass
class Contender:
    """One agent-like participant: connection, session thread and lease manager."""

    urls: list[str]
    stores: list[str]
    site: str
    node: str = "n1"
    ttl: float = 2.0
    margin: float = 0.2
    step: float = 0.05
    nc: Client | None = None
    session: SessionThread | None = None
    manager: LeaseManager | None = None
    closed_intervals: list[Interval] = field(default_factory=list)
    acquired_at: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.site}/{self.node}"

    async def _connect(self) -> Client:
        return await nats.connect(servers=self.urls, reconnect_time_wait=0.2)

    async def start(self) -> None:
        self.nc = await self._connect()
        self.session = SessionThread(
            self._connect, self.stores, self.site, self.node, ttl=self.ttl, margin=self.margin
        )
        await self.session.start()
        js = self.nc.jetstream(timeout=5)

        async def recreate(store: str) -> None:
            await ensure_store(js, store)

        self.manager = LeaseManager(
            self.nc, self.session, self.stores, step=self.step, recreate=recreate
        )
        self.manager.on_acquired.append(self._acquired)
        await self.manager.start()
        self.manager.spawn()

    def _acquired(self, name: str, token: int, deadline: float) -> None:
        self.acquired_at[name] = boottime()

    def intervals(self) -> list[Interval]:
        """Closed tenures, plus open ones ending at the current deadline (conservative)."""
        out = list(self.closed_intervals)
        if self.manager is not None:
            tenures = [*self.manager.tenures, *self.manager.open_tenures()]
            out += [Interval(t.name, self.id, t.term, t.start, t.end) for t in tenures]
        return out

    def want(self, names: Iterable[str], rank: int = 0) -> None:
        assert self.manager is not None
        for name in names:
            self.manager.want_lease(name, rank=rank)

    def held(self) -> dict[str, int]:
        return self.manager.held() if self.manager is not None else {}

    def pause(self) -> None:
        """Stop renewing (a hung agent): validity runs out on its own."""
        assert self.session is not None
        self.session.suspend(True)

    def resume(self) -> None:
        assert self.session is not None
        self.session.suspend(False)

    async def kill(self) -> None:
        """Die abruptly: no release, no close; others must expire the session."""
        if self.session is not None:
            self.session.suspend(True)
            await self.session.close(write=False)
            self.session = None
        if self.manager is not None:
            await self.manager.stop()  # records the end of belief: the process is gone
            self.closed_intervals += [
                Interval(t.name, self.id, t.term, t.start, t.end) for t in self.manager.tenures
            ]
            self.manager = None
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

    async def close(self) -> None:
        """Leave politely: release everything, then close the session in every store."""
        if self.manager is not None:
            for name in list(self.manager.held()):
                await self.manager.release(name)
            await self.manager.stop(release_budget=2.0)
            self.closed_intervals += [
                Interval(t.name, self.id, t.term, t.start, t.end) for t in self.manager.tenures
            ]
            self.manager = None
        if self.session is not None:
            await self.session.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None
