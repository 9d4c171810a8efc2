"""Shared fixtures: real nats-servers, torn down even when a test fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness.nats import NatsCluster, NatsNode
from tests.harness.netns import Sites


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsNode]:
    """One JetStream-enabled nats-server on a free loopback port."""
    node = NatsNode(name="solo", workdir=tmp_path / "nats", tags=("site:solo",))
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


@pytest.fixture
async def netns_sites(tmp_path: Path, require_netns: None) -> AsyncIterator[Sites]:
    """Three sites in network namespaces, each running one node of a stretched R3 cluster.

    ``sites.cut(name)`` / ``sites.heal(name)`` partition a site; ``sites[name].url`` reaches
    its nats-server from the test process even while it is cut off.
    """
    sites = Sites(tmp_path / "sites")
    try:
        sites.setup()
        sites.start_nats()
        for site in sites.sites.values():
            assert site.nats is not None
            await site.nats.wait_ready(30)
        yield sites
    finally:
        sites.teardown()
