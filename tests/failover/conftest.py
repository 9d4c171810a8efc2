"""A stage for failover scenarios: three netns sites, real agents, a shared tick history.

Every scenario's workload is ``tests/workloads/ticker.py``: it appends one line per 10 ms to
``stage.history`` and ``tests/harness/history.py`` rebuilds who ran when. Nothing here
sleeps to synchronise: waits are ``eventually`` polls with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from mesh.bootstrap import ensure_mesh
from mesh.names import (
    EVENTS_STREAM,
    STATE_BUCKET,
    TRUST_BUCKET,
    agent_key,
    instance_key,
    status_subject,
)
from tests.harness import history
from tests.harness.agents import AgentProcess
from tests.harness.nats import meta_complete
from tests.harness.netns import Sites
from tests.harness.wait import eventually

TICKER = Path(__file__).resolve().parents[1] / "workloads" / "ticker.py"
TTL = float(os.environ.get("HARMONY_FAILOVER_TTL", "2"))
SOAK_RUNS = int(os.environ.get("HARMONY_SOAK_RUNS", "1"))
"""Repetitions of each scenario: 1 in ``make test`` (time budget), 25 in ``make soak``."""
NOW_SLACK_NS = 150_000_000
"""An instance whose last tick is younger than this is running now (ticks every 10 ms)."""


def runs() -> list[int]:
    return list(range(max(1, SOAK_RUNS)))


def application(
    name: str,
    history_file: Path,
    *,
    trait: str = "stateful",
    strategy: str = "AbsoluteConsistency",
    reconcile: str = "keep-newest",
    sites: tuple[str, ...] = ("site-a", "site-b", "site-c"),
    fail_on: str = "",
    term_delay: float = 0.0,
    stop_timeout: str = "1s",
) -> dict[str, Any]:
    command = [sys.executable, str(TICKER), str(history_file)]
    if fail_on:
        command += ["--fail-on", fail_on]
    if term_delay:
        command += ["--term-delay", str(term_delay)]
    return {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": name},
        "spec": {
            "trait": trait,
            "failover": {"strategy": strategy, "reconcile": reconcile},
            "placement": {"sites": list(sites)},
            "score": {
                "kind": "Process",
                "command": command,
                "stop_timeout": stop_timeout,
                "backoff_initial": "200ms",
            },
        },
    }


@dataclass
class Stage:
    sites: Sites
    workdir: Path
    history: Path
    nc: Client | None = None
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    _listeners: list[Client] = field(default_factory=list)

    # --- agents -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection and kill every agent (used by the fixture and the bench;
        the sites themselves belong to whoever created them)."""
        for nc in [*self._listeners, self.nc]:
            if nc is not None and not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.close()
        for agent in self.agents.values():
            if agent.running():
                agent.kill()

    def agent(self, site: str, node: str = "n1", **extra: Any) -> AgentProcess:
        s = self.sites[site]
        idx = len([a for a in self.agents.values() if a.site == site])
        agent = AgentProcess(
            site=site,
            node=node,
            workdir=self.workdir / f"{site}-{node}",
            servers=[s.local_url],
            ttl=f"{TTL}s",
            health_host=s.mgmt_ip,
            health_port=9808 + idx,
            extra={
                "health": {"listen": f"0.0.0.0:{9808 + idx}"},
                "mesh": {"stores": list(self.sites.names)},
                **extra,
            },
            wrap=self.sites.wrap(site),
        )
        self.agents[agent.agent_id] = agent
        self.start(agent)
        return agent

    def start(self, agent: AgentProcess) -> None:
        agent.start()
        assert agent.proc is not None
        self.sites[agent.site].procs.append(agent.proc)

    async def all_ready(self, timeout: float = 60.0) -> None:
        """Every agent ready and its controller started (it writes its summary after the
        controller), so that the preferred site is contending when an Application appears."""
        for agent in self.agents.values():
            await eventually(agent.ready, timeout=timeout, what=f"{agent.agent_id} ready")

            async def attached(agent: AgentProcess = agent) -> bool:
                return (await self.heartbeat(agent)).get("state") == "alive"

            await eventually(attached, timeout=timeout, what=f"{agent.agent_id} controller")
        await check_r3(self)

    # --- mesh -----------------------------------------------------------------------------

    async def client(self) -> Client:
        if self.nc is None or self.nc.is_closed:
            urls = [s.url for s in self.sites.sites.values()]
            self.nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=-1)
        return self.nc

    async def kv(self, bucket: str = STATE_BUCKET) -> KeyValue:
        nc = await self.client()
        return await nc.jetstream(timeout=5).key_value(bucket)

    async def put(self, app: dict[str, Any]) -> None:
        async def attempt() -> bool:
            kv = await self.kv()
            await kv.put(f"app.{app['metadata']['name']}", json.dumps(app).encode())
            return True

        await eventually(attempt, timeout=30, interval=0.2, what="application stored")

    async def heartbeat(self, agent: AgentProcess) -> dict[str, Any]:
        """The agent's summary (``agent.<site>.<node>``), written on change."""
        kv = await self.kv()
        entry = await kv.get(agent_key(agent.site, agent.node))
        data: dict[str, Any] = json.loads(entry.value or b"{}")
        return data

    async def instance(self, agent: AgentProcess, app: str) -> dict[str, Any] | None:
        """The agent's report of ``app`` (``inst.<app>.<site>.<node>``), with its revision."""
        kv = await self.kv()
        try:
            entry = await kv.get(instance_key(app, agent.site, agent.node))
        except KeyNotFoundError:
            return None
        data: dict[str, Any] = json.loads(entry.value or b"{}")
        data["revision"] = entry.revision
        return data

    async def live_status(self, agent: AgentProcess) -> dict[str, Any]:
        """``harmony.status.<site>.<node>`` through that site's own server (works while cut)."""
        nc = await nats.connect(self.sites[agent.site].url, connect_timeout=2)
        try:
            msg = await nc.request(status_subject(agent.site, agent.node), b"{}", timeout=2)
            data: dict[str, Any] = json.loads(msg.data)
            return data
        finally:
            await nc.close()

    async def command(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        """Request/reply, retried while nobody serves the subject yet (the holder subscribes
        to ``harmony.cmd.app.<name>.*`` on its next cycle after acquiring)."""
        nc = await self.client()

        async def attempt() -> dict[str, Any]:
            msg = await nc.request(subject, json.dumps(body).encode(), timeout=15)
            data: dict[str, Any] = json.loads(msg.data)
            return data

        return await eventually(attempt, timeout=10, interval=0.1, what=f"reply on {subject}")

    async def listen(self, subject: str = "harmony.instances.>") -> list[tuple[int, str, str]]:
        """Record (monotonic ns, receiving site, sender agent) for every message on
        ``subject`` as each site's own server delivers it. A cut drops packets without RST,
        so route connections survive the partition and resume only at TCP's next
        retransmission (exponential backoff: 0.1 to 5 s after the link is back): the
        first message crossing after heal is when the two sides can hear each other."""
        heard: list[tuple[int, str, str]] = []
        for name, site in self.sites.sites.items():
            nc = await nats.connect(site.url, connect_timeout=2, max_reconnect_attempts=-1)
            self._listeners.append(nc)

            async def on(msg: Any, name: str = name) -> None:
                with contextlib.suppress(ValueError, KeyError):
                    heard.append((time.monotonic_ns(), name, str(json.loads(msg.data)["agent"])))

            await nc.subscribe(subject, cb=on)
        return heard

    async def holder(self, app: str) -> tuple[str | None, int | None]:
        """(holder, fencing token) of a stateful app as the lease stores show them."""
        from agent.commands.client import MeshClient
        from agent.meshview import MeshState

        client = MeshClient(await self.client(), 5.0)
        snap = (await client.read(MeshState())).snapshot()
        lease = snap.lease_of(app)
        return (lease.holder, lease.token) if lease is not None else (None, None)

    async def force_leaders(self, site: str, timeout: float = 30.0) -> list[str]:
        """Move the leader of every replicated stream, and the JetStream meta leader, onto
        ``site``'s server (the worst case for a cut of that site). Lease stores are single
        replica: they have no leader to move. Returns what was moved."""
        server = self.sites[site].nats.name  # type: ignore[union-attr]
        preferred = json.dumps({"placement": {"preferred": server}}).encode()
        nc = await self.client()
        js = nc.jetstream(timeout=5)
        moved = []
        for stream in (f"KV_{STATE_BUCKET}", f"KV_{TRUST_BUCKET}", EVENTS_STREAM):

            async def led(stream: str = stream) -> bool:
                info = await js.stream_info(stream)
                if info.cluster is not None and info.cluster.leader == server:
                    return True
                await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", preferred, timeout=5)
                return False

            await eventually(led, timeout=timeout, interval=0.2, what=f"{stream} led by {server}")
            moved.append(stream)
        sys_nc = await nats.connect(self.sites[site].url, user="sys", password="sys")
        try:

            async def meta() -> bool:
                jsz = await asyncio.to_thread(self.sites[site].nats.varz, "jsz")  # type: ignore[union-attr]
                cluster = jsz.get("meta_cluster")
                if isinstance(cluster, dict) and cluster.get("leader") == server:
                    return True
                await sys_nc.request("$JS.API.META.LEADER.STEPDOWN", preferred, timeout=5)
                return False

            await eventually(meta, timeout=timeout, interval=0.3, what=f"meta leader {server}")
            moved.append("meta")
        finally:
            await sys_nc.close()
        return moved

    # --- history --------------------------------------------------------------------------

    def instances(self, app: str | None = None) -> list[history.Instance]:
        return history.instances(history.load(self.history), app)

    def running_now(self, app: str | None = None) -> list[history.Instance]:
        now = time.monotonic_ns()
        return [i for i in self.instances(app) if now - i.last_ns < NOW_SLACK_NS]

    async def one_running(
        self, app: str, *, not_site: str | None = None, timeout: float = 30.0
    ) -> history.Instance:
        def probe() -> history.Instance | None:
            now = self.running_now(app)
            if len(now) == 1 and now[0].site != not_site:
                return now[0]
            return None

        return await eventually(probe, timeout=timeout, interval=0.05, what=f"one {app} running")

    def agent_of(self, inst: history.Instance) -> AgentProcess:
        return next(a for a in self.agents.values() if a.site == inst.site)

    def report(self, app: str | None = None) -> str:
        return history.describe(self.instances(app))


def _meta_complete(sites: Sites) -> bool:
    """Every site's node runs and the meta group is complete (R3 buckets can be placed)."""
    nodes = [site.nats for site in sites.sites.values() if site.nats is not None]
    everyone = len(nodes) == len(sites.sites) and all(n.running() for n in nodes)
    return everyone and meta_complete(nodes)


async def mesh_ready(sites: Sites) -> None:
    """Agents bootstrap the buckets with as many replicas as the cluster can place *now*:
    start them only once all three nodes joined, so every bucket is R3 (else cutting one
    site can stall a bucket for good, which is not the failover under test)."""
    await eventually(
        lambda: _meta_complete(sites), timeout=60, interval=0.1, what="3-node meta group"
    )


async def precreate_r3(sites: Sites) -> None:
    """Create the buckets at R3, the events stream and one lease store per site before any
    agent starts (agents then bind to them: a no-op), so that no bucket is created with
    fewer replicas while a peer is still joining."""
    nc = await nats.connect(servers=[s.url for s in sites.sites.values()], connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)

        async def create() -> bool:
            await ensure_mesh(js, 3, stores=list(sites.names), peer_grace=0.0)
            return True

        await eventually(create, timeout=60, interval=0.2, what="R3 buckets and stores created")
    finally:
        await nc.close()


async def check_r3(stage: Stage) -> None:
    js = (await stage.client()).jetstream(timeout=5)
    info = await js.stream_info(f"KV_{STATE_BUCKET}")
    assert info.config.num_replicas == 3, f"{STATE_BUCKET} has {info.config.num_replicas} replicas"


@pytest.fixture
async def stage(netns_sites: Sites, tmp_path: Path) -> AsyncIterator[Stage]:
    st = Stage(netns_sites, tmp_path, tmp_path / "history.txt")
    st.history.touch(mode=0o666)
    await mesh_ready(netns_sites)
    await precreate_r3(netns_sites)
    try:
        yield st
    finally:
        await st.close()
