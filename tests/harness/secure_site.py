"""One site's agent-side security, run inside the site's namespace by the eviction test.

``python -m tests.harness.secure_site CONFIG.yaml`` does what the daemon does with
``agent.security`` (the same calls, in the same order): render and run the embedded
nats-server (mTLS, accounts, loopback system user), connect as the site's agent, sync the
signed trust bundle, and on every change reload the server without the evicted routes and
kick the evicted clients. It writes its ``status()`` to ``<state_dir>/security.json``
every half second for the test to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import uvloop

from agent.config import load_config
from agent.logs import configure
from agent.security import SiteSecurity, connection_options, embedded_spec, system_password
from mesh.connection import MeshConnection
from mesh.embedded import EmbeddedServer
from mesh.trust import write_atomically


async def main(path: str) -> None:
    config = load_config(path)
    configure("info", "json", site=config.site, node=config.node)
    password = system_password()
    embedded = EmbeddedServer(
        embedded_spec(config, password), config.state_dir / "nats" / "nats-server.conf"
    )
    connection = MeshConnection(connection_options(config))
    security = SiteSecurity(
        config, connection=connection, embedded=embedded, system_password=password
    )
    server = asyncio.create_task(embedded.run(), name="nats-server")
    await embedded.wait_started()
    await connection.connect()
    kv = None
    while kv is None:  # the admin creates harmony-trust once the mesh is up
        with contextlib.suppress(Exception):
            kv = await connection.js.key_value("harmony-trust")
        if kv is None:
            await asyncio.sleep(0.2)
    sync = security.trust_sync(kv)
    tasks = [server, asyncio.create_task(sync.run(), name="trust-sync")]
    status = config.state_dir / "security.json"
    while not any(t.done() for t in tasks):
        body = {"connected": connection.connected, **security.status()}
        write_atomically(status, json.dumps(body, default=str).encode())
        await asyncio.sleep(0.5)
    for t in tasks:
        if t.done() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
