"""The runner carries role plans out: fake ports, a fake replicated Interpret, a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.application import Application
from agent.controller.model import Replica
from agent.controller.runner import AppRunner
from scores.base import (
    REPLICATION_EXTRA,
    Observation,
    Outcome,
    PrimaryInfo,
    ReplicatedInterpret,
    ReplicationStatus,
    Role,
    RunContext,
    WorkloadState,
)
from tests.controller.test_runner import FakePorts

MIB = 1024 * 1024


class FakeReplicated(ReplicatedInterpret):
    """An instance whose role, position and failures the test sets."""

    enforces_deadline = True

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.role: Role | None = None
        self.running = False
        self.position = 10 * MIB
        self.timeline = 1
        self.fail: str | None = None
        self.ctx: RunContext | None = None
        self.sync: tuple[str, ...] = ()

    def _status(self) -> ReplicationStatus:
        if self.role is None:
            return ReplicationStatus(Role.REPLICA, None, None, None, "no data", False, False)
        return ReplicationStatus(self.role, self.position, self.timeline, 0, "fake", self.running)

    @property
    def acts(self) -> list[str]:
        """Calls that change something (status is read all the time)."""
        return [c for c in self.calls if c != "status"]

    def _act(self, what: str) -> Outcome | None:
        self.calls.append(what)
        return Outcome.failed(self.fail) if self.fail else None

    async def start_primary(self, ctx: RunContext) -> Outcome:
        self.ctx = ctx
        failed = self._act(f"start_primary {ctx.fencing_token}")
        if failed:
            return failed
        self.role, self.running = Role.PRIMARY, True
        return Outcome.done("primary")

    async def start_replica(self, ctx: RunContext, primary: PrimaryInfo | None) -> Outcome:
        pending = " pending" if primary and primary.extra.get("pending") else ""
        failed = self._act(f"start_replica {primary.site if primary else None}{pending}")
        if failed:
            return failed
        self.role, self.running = Role.REPLICA, True
        return Outcome.done("replica")

    async def promote(self, ctx: RunContext) -> Outcome:
        self.ctx = ctx
        failed = self._act(f"promote {ctx.fencing_token}")
        if failed:
            return failed
        self.role = Role.PRIMARY
        return Outcome.done("promoted")

    async def demote(self, primary: PrimaryInfo | None = None) -> Outcome:
        self.calls.append(f"demote {primary.site if primary else None}")
        was = self.running
        self.running = primary is not None
        if self.role is not None:
            self.role = Role.REPLICA
        return Outcome.done("demoted", changed=was)

    async def stop(self) -> Outcome:
        return await self.demote()

    async def status(self) -> ReplicationStatus:
        self.calls.append("status")
        return self._status()

    async def observe(self) -> Observation:
        if not self.running:
            return Observation(WorkloadState.STOPPED, "", reason="stopped")
        return Observation(
            WorkloadState.RUNNING, "", pids=(999_999,), extra={REPLICATION_EXTRA: self._status()}
        )

    def endpoint(self) -> dict[str, Any]:
        return {"host": "10.0.0.1", "port": 5432, "application_name": "site_a_n1"}

    async def set_sync_standbys(self, names: Sequence[str]) -> Outcome:
        self.sync = tuple(names)
        return Outcome.done("sync")


def pg_application() -> Application:
    return Application.model_validate(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": "ledger"},
            "spec": {
                "trait": "stateful",
                "placement": {"sites": ["site-a", "site-b"]},
                "score": {"kind": "PostgreSQL", "replication_password_file": "/x"},
            },
        }
    )


def peer(role: str = "replica", **kw: object) -> Replica:
    base = Replica("site-b/n1", role, True, 10 * MIB, 1, 0, host="10.0.0.2", port=5432, name="b")
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path: Path) -> tuple[FakePorts, AppRunner, FakeReplicated]:
    ports = FakePorts(tmp_path)
    ports.apps["ledger"] = pg_application()
    runner = AppRunner("ledger", ports)
    interpret = FakeReplicated()
    runner.interpret = interpret
    runner.score = ports.apps["ledger"].spec.score
    runner.replicated = True
    return ports, runner, interpret


async def test_first_primary_then_a_promotion_after_the_poll(world: Any) -> None:
    ports, runner, pg = world
    await runner.step()
    assert ports.leases.wants == {"ledger": 0}, "nobody has data: contend to initialise"
    ports.leases.grant("ledger", 5)
    await runner.step()
    assert pg.acts[-1] == "start_primary 5" and runner.run_token == 5
    assert pg.ctx.deadline is not None and pg.ctx.deadline.at == ports.leases.valid_until
    report = ports.reports[-1]
    assert report.state.value == "running" and report.replication is not None
    assert report.replication["role"] == "primary" and report.replication["host"] == "10.0.0.1"

    # The lease moves on; this primary is demoted, then it is a replica that gets it back.
    ports.leases.tokens.clear()
    ports.replica_list = [peer("primary", token=6)]
    await runner.step()
    assert pg.acts[-1] == "demote site-b" and runner.run_token is None
    await asyncio.sleep(0)  # the runner stopped wanting the lease (a background release)
    ports.replica_list = [peer(running=False, role="primary", live=False, token=6)]
    ports.leases.grant("ledger", 7)
    await runner.step()  # the stale primary does not count as live: nothing to poll
    assert pg.acts[-1] == "promote 7" and runner.run_token == 7

    ports.leases.tokens.clear()
    ports.replica_list = [peer("primary", token=8)]
    await runner.step()
    await asyncio.sleep(0)
    ports.leases.grant("ledger", 9)
    ports.replica_list = [peer()]
    await runner.step()
    assert ports.polls == [("ledger", 9)] and pg.acts[-1] != "promote 9"
    ports.replica_list = [peer(answered=9)]
    await runner.step()
    assert pg.acts[-1] == "promote 9"


async def test_handing_over_keeps_a_known_replica_and_stops_anything_else(world: Any) -> None:
    ports, runner, pg = world
    pg.role, pg.running = Role.REPLICA, True
    ports.replica_list = [peer(position=11 * MIB, answered=4)]
    ports.leases.grant("ledger", 4)
    await runner.step()
    assert ("release", "site-b/n1") in ports.leases.calls
    assert pg.running and "demote None" not in pg.calls, "a replica keeps running"

    pg.calls.clear()
    ports.leases.calls.clear()
    ports.leases.grant("ledger", 5)
    runner.local = ReplicationStatus(Role.REPLICA, None, None, None, "?", False, False)
    pg.role = None  # the state cannot be read: the lease goes only after a stop
    ports.replica_list = [peer(answered=5)]
    await runner.step()
    assert ("release", "site-b/n1") in ports.leases.calls and "demote None" in pg.calls


async def test_a_failed_role_change_backs_off(world: Any) -> None:
    ports, runner, pg = world
    ports.replica_list = [peer("primary", token=3)]
    pg.fail = "port-in-use"
    await runner.step()
    assert pg.acts == ["start_replica site-b"]
    assert runner.start_failed == "port-in-use" and runner.failures == 1
    await runner.step()
    assert pg.acts.count("start_replica site-b") == 1, "not again before the backoff"
    assert ports.reports[-1].state.value == "failed"
    ports.now = runner.backoff_until + 0.01
    pg.fail = None
    await runner.step()
    assert pg.acts[-1] == "start_replica site-b" and runner.following == ("site-b/n1", 3)


async def test_positions_are_written_at_most_every_third_of_a_ttl(world: Any) -> None:
    ports, runner, pg = world
    pg.role, pg.running = Role.REPLICA, True
    ports.replica_list = [peer("primary", token=3)]
    await runner.step()
    await runner.step()
    written = len(ports.reports)
    pg.position += 100
    ports.now += 0.1
    await runner.step()
    assert len(ports.reports) == written, "a moving position alone waits"
    assert runner.report.replication is not None
    assert runner.report.replication["position"] == pg.position, "gossip has it at once"
    ports.now += ports.timing.ttl / 3
    await runner.step()
    assert len(ports.reports) == written + 1
    pg.timeline = 2  # a role fact changes: written at once
    ports.now += 0.1
    await runner.step()
    assert len(ports.reports) == written + 2
    assert ports.reports[-1].replication is not None
    assert ports.reports[-1].replication["timeline"] == 2


async def test_answering_a_poll_observes_after_the_question(world: Any) -> None:
    ports, runner, pg = world
    pg.role, pg.running = Role.REPLICA, True
    ports.replica_list = [peer("primary", token=3)]
    await runner.step()
    pg.calls.clear()
    pg.position += 4096
    await runner.answer(12)
    assert pg.calls == ["status"]
    rep = ports.reports[-1].replication
    assert rep is not None and rep["answered"] == 12 and rep["position"] == pg.position
