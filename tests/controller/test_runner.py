"""The runner's I/O around ``decide``, with a fake lease manager, Interpret and clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.application import Application
from agent.controller.controller import Controller
from agent.controller.runner import AppRunner
from scores.base import Interpret, Observation, Outcome, RunContext, WorkloadState


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeLeases:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.tokens: dict[str, int] = {}
        self.valid_until = float("-inf")
        self.wanted: dict[str, tuple[str, int]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.on_acquired: list[Any] = []
        self.on_lost: list[Any] = []
        self.on_deadline: list[Any] = []

    def grant(self, name: str, token: int, ttl: float = 2.0) -> None:
        self.tokens[name] = token
        self.valid_until = self.clock() + ttl

    def held(self) -> dict[str, int]:
        return dict(self.tokens) if self.clock() < self.valid_until else {}

    def deadline(self) -> float:
        return self.valid_until

    def observe(self) -> dict[str, Any]:
        return {}

    def want(self, name: str, key: str, *, rank: int = 0) -> None:
        self.wanted[name] = (key, rank)
        self.calls.append(("want", name))

    async def release(self, name: str, *, to: str | None = None, stop: Any = None) -> bool:
        self.wanted.pop(name, None)
        had = self.tokens.pop(name, None) is not None
        if had and stop is not None:
            await stop()
        self.calls.append(("release", to))
        return had

    async def handover(self, name: str, to: str, *, stop: Any = None) -> bool:
        return await self.release(name, to=to, stop=stop)


class FakeInterpret(Interpret):
    enforces_deadline = True

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.state = WorkloadState.STOPPED
        self.reason: str | None = None
        self.restarts = 0
        self.ctx: RunContext | None = None
        self.deadlines: list[float | None] = []

    async def apply(self, ctx: RunContext) -> Outcome:
        self.ctx = ctx
        self.state = WorkloadState.RUNNING
        self.log.append(f"apply {ctx.fencing_token}")
        return Outcome.done("started")

    async def stop(self) -> Outcome:
        changed = self.state is WorkloadState.RUNNING
        self.state = WorkloadState.STOPPED
        if changed:
            self.log.append("stop")
        return Outcome.done("stopped", changed=changed)

    async def observe(self) -> Observation:
        pids = (999_999,) if self.state is WorkloadState.RUNNING else ()
        return Observation(self.state, "", pids, self.reason, self.restarts)

    def extend_deadline(self, monotonic_deadline: float) -> None:
        self.deadlines.append(monotonic_deadline)

    def clear_deadline(self) -> None:
        self.deadlines.append(None)


class FakeEvents:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int | None]] = []
        self.nc = None

    async def publish(self, event: str, app: str, token: int | None, **fields: Any) -> None:
        self.sent.append((event, token))


def app(strategy: str = "AbsoluteConsistency", reconcile: str = "keep-newest") -> Application:
    return Application.model_validate(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": "ledger"},
            "spec": {
                "trait": "stateful",
                "failover": {"strategy": strategy, "reconcile": reconcile},
                "placement": {"sites": ["site-b", "site-a"]},
                "score": {"kind": "Process", "command": ["true"]},
            },
        }
    )


@pytest.fixture
def world(tmp_path: Path) -> tuple[Controller, AppRunner, FakeLeases, FakeInterpret, list[str]]:
    clock = Clock()
    leases = FakeLeases(clock)
    log: list[str] = []
    ctl = Controller(
        site="site-a",
        node="n1",
        state_dir=tmp_path,
        ttl=2.0,
        max_failures=3,
        leases=leases,  # type: ignore[arg-type]
        events=FakeEvents(),  # type: ignore[arg-type]
        topology=None,  # type: ignore[arg-type]
        clock=clock,
    )
    runner = AppRunner("ledger", ctl)
    interpret = FakeInterpret(log)
    runner.interpret = interpret
    ctl.runners["ledger"] = runner
    return ctl, runner, leases, interpret, log


def set_app(ctl: Controller, runner: AppRunner, a: Application) -> None:
    ctl.desired["ledger"] = a
    runner.score = a.spec.score


async def test_consistent_start_uses_token_and_lease_deadline(world: Any) -> None:
    ctl, runner, leases, interpret, log = world
    set_app(ctl, runner, app())
    await runner.step()
    assert leases.wanted == {"ledger": ("app.ledger", 1)}  # site-a is second in placement
    leases.grant("ledger", 42)
    await runner.step()
    assert log == ["apply 42"] and interpret.ctx.deadline == leases.valid_until
    assert interpret.ctx.fencing_token == 42 and interpret.deadlines[-1] == leases.valid_until
    assert ctl.status()["instances"][0] | {"detail": ""} == {
        "app": "ledger",
        "state": "running",
        "token": 42,
        "detail": "",
        "lease_token": 42,
        "partitioned": False,
        "pid": 999_999,
    }
    recorded = json.loads(ctl.statefile.path.read_text())
    assert recorded["ledger"]["token"] == 42 and recorded["ledger"]["pid"] == 999_999
    leases.valid_until += 0.7  # a renewal: the guard deadline follows
    ctl._feed_deadline(leases.valid_until)
    assert interpret.deadlines[-1] == leases.valid_until
    ctl.clock.t = leases.valid_until + 0.01  # type: ignore[attr-defined]
    await runner.step()
    assert log[-1] == "stop" and runner.state.value == "standby"
    assert ("lease-lost", 42) in ctl.events.sent  # type: ignore[attr-defined]


async def test_split_brain_keeps_serving_then_loses_reconcile(world: Any) -> None:
    ctl, runner, leases, interpret, log = world
    set_app(ctl, runner, app("SplitBrainAllowed"))
    leases.grant("ledger", 5)
    await runner.step()
    assert interpret.deadlines == [None] and log == ["apply 5"]
    ctl.clock.t = leases.valid_until + 5  # partitioned: lease gone, workload stays
    await runner.step()
    report = runner.report()
    assert report.state.value == "running" and report.partitioned and report.token == 5
    assert "partitioned" in report.detail and log == ["apply 5"]
    beat = {
        "agent": "site-b/n1",
        "site": "site-b",
        "state": "alive",
        "instances": [{"app": "ledger", "state": "running", "token": 9}],
    }
    ctl.peers.feed("core:harmony.instances.site-b.n1", json.dumps(beat).encode())
    await runner.step()
    assert log[-1] == "stop" and runner.state.value == "standby"
    assert not ctl.statefile.path.exists() or "ledger" not in ctl.statefile.load()


async def test_crash_loop_gives_up_and_releases(world: Any) -> None:
    ctl, runner, leases, interpret, _log = world
    set_app(ctl, runner, app())
    leases.grant("ledger", 7, ttl=100)
    await runner.step()
    interpret.state, interpret.reason, interpret.restarts = WorkloadState.FAILED, "crashed", 2
    await runner.step()
    assert ("release", None) in leases.calls and "ledger" not in leases.wanted
    assert runner.cooldown_until > ctl.clock() and runner.state.value == "failed"
    await runner.step()
    assert "ledger" not in leases.wanted  # still cooling down: not contending


async def test_shutdown_stops_then_releases(world: Any) -> None:
    ctl, runner, leases, _interpret, log = world
    set_app(ctl, runner, app())
    leases.grant("ledger", 3, ttl=100)
    await runner.step()
    await ctl.shutdown()
    assert log == ["apply 3", "stop"] and leases.tokens == {}
    assert runner.report().state.value == "stopped"


async def test_planned_failover_stops_before_handover(world: Any) -> None:
    ctl, runner, leases, _interpret, log = world
    set_app(ctl, runner, app())
    leases.grant("ledger", 3, ttl=100)
    await runner.step()
    beat = {"agent": "site-b/n1", "site": "site-b", "state": "alive", "instances": []}
    ctl.peers.feed("agent.site-b.n1", json.dumps(beat).encode())
    reply = await ctl.failover("ledger", None)
    assert reply.ok and reply.fields["to"] == "site-b"
    assert log == ["apply 3", "stop"] and ("release", "site-b") in leases.calls
    refused = await ctl.failover("ledger", "site-b")
    assert not refused.ok and "does not hold" in (refused.error or "")
