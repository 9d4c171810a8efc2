"""A real nats-server with the mesh buckets, and a CommandServer on it as agent site-a/node-1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from nats.aio.client import Client

from agent.commands import CommandServer, Reply
from mesh.bootstrap import Mesh as MeshHandles
from tests.commands.helpers import connect, seed_world
from tests.harness.nats import NatsNode


@dataclass
class FakeController:
    """Records failover calls; answers as a controller's handover would."""

    calls: list[tuple[str, str | None]] = field(default_factory=list)
    refuse: str | None = None
    explode: bool = False

    async def failover(self, app: str, to_site: str | None) -> Reply:
        self.calls.append((app, to_site))
        if self.explode:
            raise RuntimeError("controller bug")
        if self.refuse:
            return Reply.failure(self.refuse)
        return Reply.success(message=f"handing over to {to_site or 'next site'}", to=to_site)


@dataclass
class Plane:
    url: str
    nc: Client
    buckets: MeshHandles
    server: CommandServer
    controller: FakeController
    tokens: dict[str, int]

    async def request(self, subject: str, data: bytes, timeout: float = 5.0) -> Reply:
        msg = await self.nc.request(subject, data, timeout=timeout)
        return Reply.decode(msg.data)


@pytest.fixture
async def plane(nats_server: NatsNode) -> AsyncIterator[Plane]:
    nc, buckets = await connect(nats_server.url)
    tokens = await seed_world(buckets, nc)
    controller = FakeController()
    server = CommandServer(
        nc, buckets.state, site="site-a", node="node-1", failover=controller.failover
    )
    await server.start()
    await server.sync_apps({"ledger"})
    try:
        yield Plane(nats_server.url, nc, buckets, server, controller, tokens)
    finally:
        await server.stop()
        await nc.close()
