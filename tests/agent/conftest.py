"""Fixtures shared by the agent tests that need a mesh on the 3-node cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import yaml
from nats.aio.client import Client

from agent.config import load_config
from agent.daemon import Agent
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsCluster
from tests.mesh.lease_world import make_mesh


@pytest.fixture
async def mesh_client(nats_cluster: NatsCluster) -> AsyncIterator[Client]:
    """A client of the cluster, once the mesh (buckets and one store per node) exists."""
    await make_mesh(nats_cluster.urls, nats_cluster.stores)
    nc = await nats.connect(servers=nats_cluster.urls)
    yield nc
    await nc.close()


def in_process_agent(workdir: Path, cluster: NatsCluster, ttl: float) -> Agent:
    """An agent run in the test's own loop, configured as ``tests.harness.agents`` configures
    a subprocess agent (so that the test can reach into it)."""
    spec = AgentProcess(
        site="site-a",
        node="n1",
        workdir=workdir,
        servers=cluster.urls,
        ttl=f"{ttl}s",
        extra={"mesh": {"stores": cluster.stores}},
    )
    spec.workdir.mkdir(parents=True)
    spec.config_path.write_text(yaml.safe_dump(spec.config()))
    return Agent(load_config(spec.config_path))
