"""Real nats-server processes for tests: one node, or a 3-node JetStream cluster on loopback.

Configs are rendered by ``mesh.embedded.render_config``, the same code the agent uses for
its embedded node, so the tests exercise the production configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client

from mesh.embedded import ServerSpec, find_nats_server, render_config
from mesh.stores import WRONG_LAST_SEQUENCE
from tests.harness.ports import free_port
from tests.harness.wait import eventually


@dataclass
class NatsNode:
    """One nats-server process with its own ports and store directory."""

    name: str
    workdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    routes: tuple[str, ...] = ()
    extra: str = ""
    wrap: tuple[str, ...] = ()
    """Command prefix, e.g. ``("ip", "netns", "exec", ns)`` to run inside a namespace."""
    bind: str | None = None
    tags: tuple[str, ...] = ()
    """Server tags, e.g. ``("site:n1",)``: lease stores are placed by them."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def route_url(self) -> str:
        return f"nats-route://{self.host}:{self.cluster_port}"

    def spec(self) -> ServerSpec:
        bind = self.bind or self.host
        return ServerSpec(
            name=self.name,
            store_dir=self.workdir / "store",
            listen=f"{bind}:{self.port}",
            monitor_listen=f"{bind}:{self.monitor_port}",
            cluster_listen=f"{bind}:{self.cluster_port}" if self.cluster_port else None,
            routes=self.routes,
            no_advertise=bool(self.wrap),
            extra=self.extra,
            tags=self.tags,
        )

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.write_text(render_config(self.spec()))
        log = open(self.workdir / "nats.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [*self.wrap, find_nats_server(), "-c", str(conf)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def varz(self, endpoint: str = "varz") -> dict[str, object]:
        with urllib.request.urlopen(f"{self.monitor_url}/{endpoint}", timeout=2) as resp:
            data: dict[str, object] = json.loads(resp.read())
            return data

    def healthy(self) -> bool:
        """JetStream is up and, in a cluster, this node has caught up (monitor /healthz)."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.healthy):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout}s: {self.log()}")
            await asyncio.sleep(0.05)

    def log(self, tail: int = 2000) -> str:
        path = self.workdir / "nats.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""


async def writable(urls: list[str], buckets: list[str], timeout: float = 30) -> None:
    """Wait until a write to each KV bucket, sent through each server, reaches its stream.

    A stream created a moment ago is known to the other servers of the cluster only once
    its subject interest has propagated; until then a write through them gets "no
    responders" (seen in CI: a test's first write right after creating the mesh, to a lease
    store and to ``harmony-state``). The probe is a compare-and-set that cannot match, so
    the stream answers "wrong last sequence" and nothing is written."""
    for url in urls:
        nc = await nats.connect(servers=[url])
        try:
            for bucket in buckets:

                async def answers(nc: Client = nc, bucket: str = bucket) -> bool:
                    msg = await nc.request(
                        f"$KV.{bucket}.{PROBE}",
                        b"",
                        timeout=2.0,
                        headers={"Nats-Expected-Last-Subject-Sequence": str(1 << 62)},
                    )
                    error = json.loads(msg.data).get("error") or {}
                    assert error.get("err_code") == WRONG_LAST_SEQUENCE, msg.data
                    return True

                await eventually(answers, timeout=timeout, what=f"bucket {bucket} via {url}")
        finally:
            await nc.close()


PROBE = "probe.ready"
"""A key no test uses: the readiness probe's compare-and-set names it and never writes it."""


def meta_complete(nodes: Sequence[NatsNode]) -> bool:
    """Every running node sees the JetStream meta leader, and the leader sees every other
    running node as a current peer (monitor ``/jsz``)."""
    running = [n for n in nodes if n.running()]
    leader_ok = False
    for node in running:
        try:
            meta = node.varz("jsz").get("meta_cluster")
        except (OSError, ValueError):
            return False
        if not isinstance(meta, dict) or not meta.get("leader"):
            return False
        if meta["leader"] == node.name:
            peers = meta.get("replicas") or []
            leader_ok = len(peers) >= len(running) - 1 and all(p.get("current") for p in peers)
    return leader_ok


class NatsCluster:
    """Three (or n) JetStream nodes on loopback joined by routes."""

    def __init__(self, workdir: Path, size: int = 3, name: str = "n") -> None:
        ports = [free_port() for _ in range(size)]
        self.nodes = []
        for i in range(size):
            routes = tuple(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(ports) if j != i)
            self.nodes.append(
                NatsNode(
                    name=f"{name}{i + 1}",
                    workdir=workdir / f"{name}{i + 1}",
                    cluster_port=ports[i],
                    routes=routes,
                    tags=(f"site:{name}{i + 1}",),
                )
            )

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def stores(self) -> list[str]:
        """One lease store per node (placed by the node's ``site:`` tag)."""
        return [n.name for n in self.nodes]

    async def start(self) -> None:
        for node in self.nodes:
            node.start()
        await asyncio.gather(*(n.wait_ready(30) for n in self.nodes))
        await self.wait_meta_leader()

    async def wait_meta_leader(self, timeout: float = 30.0) -> None:
        """A JetStream cluster accepts stream creation only once it has a meta leader, and
        places replicas and tagged stores only on peers that leader already sees."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await asyncio.to_thread(meta_complete, self.nodes):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("no JetStream meta leader that sees every peer")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
