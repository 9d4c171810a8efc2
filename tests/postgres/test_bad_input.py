"""Bad hosts and bad directories are clear errors, as values; nothing is ever deleted."""

from __future__ import annotations

import os
import socket
import time

import pytest

from scores.base import WorkloadState
from scores.roles import PrimaryInfo, Role
from tests.harness.ports import free_port
from tests.postgres.conftest import Cluster


async def test_missing_binaries(cluster: Cluster) -> None:
    node = cluster.node("a", bin_dir="/nonexistent/bin")
    outcome = await node.interpret.start_primary(node.ctx())
    assert not outcome.ok, outcome
    assert "missing-binaries" in outcome.message and "/nonexistent/bin" in outcome.message
    observed = await node.interpret.observe()
    assert (observed.state, observed.reason) == (WorkloadState.FAILED, "missing-binaries")
    assert "set bin_dir" in observed.detail
    assert not node.state_dir.exists(), "nothing is created on a host that cannot run it"


async def test_port_in_use(cluster: Cluster) -> None:
    port = free_port()
    node = cluster.node("a", port=port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        outcome = await node.interpret.start_primary(node.ctx())
        assert not outcome.ok and "port-in-use" in outcome.message, outcome
        assert str(port) in outcome.message
        observed = await node.interpret.observe()
        assert (observed.state, observed.reason) == (WorkloadState.FAILED, "port-in-use")
    retried = await node.interpret.start_primary(node.ctx())
    assert retried.ok, retried


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory of another user")
async def test_a_data_directory_of_another_user_is_left_alone(cluster: Cluster) -> None:
    primary = await cluster.primary("a")
    data = cluster.workdir / "somebody" / "pgdata"
    node = cluster.node("b", data_dir=str(data))
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    (data / "precious").write_text("do not delete\n")
    os.chown(data, 0, 0)  # root's, not the database's OS user
    before = sorted(p.name for p in data.iterdir())
    for attempt in (
        lambda: node.interpret.start_primary(node.ctx()),
        lambda: node.interpret.start_replica(node.ctx(), primary.info()),
        lambda: node.interpret.promote(node.ctx(token=9)),
    ):
        outcome = await attempt()
        assert not outcome.ok and "data-dir-owned" in outcome.message, outcome
        assert "owned by root" in outcome.message and "nothing was changed" in outcome.message
    assert sorted(p.name for p in data.iterdir()) == before
    assert (data / "precious").read_text() == "do not delete\n"
    assert data.stat().st_uid == 0
    observed = await node.interpret.observe()
    assert (observed.state, observed.reason) == (WorkloadState.FAILED, "data-dir-owned")
    status = await node.interpret.status()
    assert status.role is Role.REPLICA and "data-dir-owned" in status.detail


async def test_a_directory_without_a_cluster_is_not_touched(cluster: Cluster) -> None:
    primary = await cluster.primary("a")
    node = cluster.node("b")
    node.interpret.attach(node.ctx())
    assert (await node.interpret.start_replica(node.ctx(), primary.info())).ok
    assert (await node.interpret.stop()).ok
    data = node.data_dir
    (data / "PG_VERSION").rename(data / "PG_VERSION.bak")  # no longer recognisably a cluster
    outcome = await node.interpret.start_replica(node.ctx(), primary.info())
    assert not outcome.ok and "not-a-data-dir" in outcome.message, outcome
    assert (data / "PG_VERSION.bak").exists() and (data / "base").is_dir()
    assert not list(data.parent.glob("pgdata.replaced-*")), "nothing may be moved either"


async def test_an_unreachable_primary_fails_in_bounded_time(cluster: Cluster) -> None:
    node = cluster.node("b", basebackup_timeout="20s")
    nowhere = PrimaryInfo("a", "n1", "127.0.0.1", free_port(), 5)
    started = time.monotonic()
    outcome = await node.interpret.start_replica(node.ctx(), nowhere)
    assert not outcome.ok and "basebackup-failed" in outcome.message, outcome
    assert time.monotonic() - started < 60
    assert not node.data_dir.exists()
