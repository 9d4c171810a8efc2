"""The same Interpret through LinuxSshTopology: a real sshd on loopback, real PostgreSQL.

The SSH host is this machine, so the test can look at the files the Score wrote there; the
commands, the deadline writes and the host clock all go through SSH.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from scores.postgres.host import boottime
from scores.roles import Role
from tests.harness.wait import eventually
from tests.postgres.client import Writer, missing_ids
from tests.postgres.conftest import Cluster
from tests.topologies.conftest import Sshd
from topologies.ssh import LinuxSshTopology


@pytest.fixture
async def remote(sshd: Sshd) -> AsyncIterator[LinuxSshTopology]:
    topology = LinuxSshTopology(sshd.config(command_timeout=60.0))
    yield topology
    await topology.close()


async def test_primary_over_ssh_replica_local_and_the_deadline_holds_remotely(
    remote: LinuxSshTopology, cluster: Cluster
) -> None:
    primary = cluster.node("a", shell=remote)
    primary.token = 5
    deadline = boottime() + 60
    started = await primary.interpret.start_primary(primary.ctx(deadline=deadline))
    assert started.ok, started
    assert primary.interpret.endpoint()["host"] == "127.0.0.1"
    replica = await cluster.replica("b", primary)
    writer = Writer(primary.dsn)
    await writer.prepare()
    assert await writer.write_one() is not None, writer.last_error

    async def replicated() -> bool:
        return await missing_ids(replica.dsn, writer.acked_ids) == []

    await eventually(replicated, timeout=20, what="the local replica of the SSH primary")
    status = await primary.interpret.status()
    assert status.role is Role.PRIMARY and "replicas: b_n1" in status.detail, status

    # The deadline file on the host holds our deadline converted to its clock, never later.
    written = float((primary.run_dir / "deadline").read_text())
    assert written <= deadline and deadline - written < 1.0

    # Extensions travel over SSH in the background; once they stop, the host's watchdog
    # kills postgres at the deadline with no help from us.
    soon = boottime() + 1.5
    primary.interpret.extend_deadline(soon)
    await eventually(
        lambda: float((primary.run_dir / "deadline").read_text()) <= soon,
        timeout=10,
        what="the remote deadline write",
    )

    def killed() -> bool:
        state = json.loads((primary.run_dir / "watchdog.json").read_text())
        return state.get("state") == "exited" and state.get("reason") == "deadline"

    await eventually(killed, timeout=20, what="the remote watchdog to fence at the deadline")
    state = json.loads((primary.run_dir / "watchdog.json").read_text())
    print(f"remote watchdog killed {state['late'] * 1000:.1f} ms after its deadline")
    assert (await primary.interpret.observe()).reason == "deadline"
