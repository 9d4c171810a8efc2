"""CLI tests: a real nats-server with the mesh buckets; the CLI runs in a worker thread
(it calls ``asyncio.run`` itself) so the test's loop can keep serving commands meanwhile."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner, Result
from nats.aio.client import Client

from agent.cli import cli
from mesh.bootstrap import Mesh as MeshHandles
from tests.commands.helpers import connect
from tests.harness.nats import NatsNode

Invoke = Callable[..., Awaitable[Result]]


@dataclass
class Mesh:
    url: str
    nc: Client
    buckets: MeshHandles
    node: NatsNode


@pytest.fixture(autouse=True)
def isolated_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the machine's contexts or HARMONY_* connection variables: connections
    come from what each test passes. Returns the XDG config home the CLI uses."""
    from agent.cli.profile import CONFIG_ENV, CONTEXT_ENV, ENV

    for name in (*ENV.values(), CONTEXT_ENV, CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


@pytest.fixture
async def mesh(nats_server: NatsNode) -> AsyncIterator[Mesh]:
    nc, buckets = await connect(nats_server.url)
    try:
        yield Mesh(nats_server.url, nc, buckets, nats_server)
    finally:
        await nc.close()


@pytest.fixture
def invoke() -> Iterator[Invoke]:
    """Run the CLI; log lines of in-process agents go to the real stderr meanwhile, not into
    the CLI's captured stdout (CliRunner swaps sys.stdout for the whole process)."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__))
    runner = CliRunner()

    async def run(*args: str, input: str | None = None) -> Result:
        return await asyncio.to_thread(runner.invoke, cli, list(args), input=input)

    try:
        yield run
    finally:
        structlog.configure(**saved)
