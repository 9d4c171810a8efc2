"""Shared fixtures: real nats-servers, torn down even when a test fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness.nats import NatsCluster, NatsNode


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsNode]:
    """One JetStream-enabled nats-server on a free loopback port."""
    node = NatsNode(name="solo", workdir=tmp_path / "nats")
    node.start()
    try:
        await node.wait_ready()
        yield node
    finally:
        node.stop()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A 3-node JetStream cluster on loopback (routes between all nodes)."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()


def netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` for network namespaces"
    return None


@pytest.fixture
def require_netns() -> Iterator[None]:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    yield
