"""The runner carries plans out through its ports: fake ports, fake Interpret, fake clock.

No controller and no NATS here: that the runner needs nothing but ``Ports`` is the point.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.application import Application
from agent.controller.model import PeerInstance, Replica
from agent.controller.runner import AppRunner, InstanceReport
from agent.timing import Timing
from scores.base import Deadline, Interpret, Observation, Outcome, RunContext, WorkloadState

NOW = 1000.0


class FakeLeases:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.tokens: dict[str, int] = {}
        self.valid_until = float("-inf")
        self.wants: dict[str, int] = {}
        self.calls: list[tuple[str, Any]] = []
        self.follows = True

    def grant(self, name: str, token: int, ttl: float = 2.0) -> None:
        self.tokens[name] = token
        self.valid_until = self.clock() + ttl

    def want_lease(self, name: str, *, rank: int = 0) -> None:
        self.wants[name] = rank
        self.calls.append(("want", name))

    def want_slot(self, name: str) -> None:
        self.want_lease(name)

    def wanted(self, name: str) -> bool:
        return name in self.wants

    def held(self) -> dict[str, int]:
        return dict(self.tokens) if self.clock() < self.valid_until else {}

    def deadline(self, name: str) -> float:
        return self.valid_until if name in self.tokens else float("-inf")

    def follows_session(self, name: str) -> bool:
        return self.follows

    def support(self, name: str) -> tuple[tuple[str, str], ...]:
        return ()

    async def release(
        self, name: str, *, to: str | None = None, stop: Callable[[], Awaitable[None]] | None = None
    ) -> bool:
        self.wants.pop(name, None)
        had = self.tokens.pop(name, None) is not None
        if had and stop is not None:
            await stop()
        self.calls.append(("release", to))
        return had


class FakeInterpret(Interpret):
    enforces_deadline = True

    def __init__(self, log: list[str], *, hang: bool = False, fail: str | None = None) -> None:
        self.log = log
        self.hang = hang
        self.fail = fail
        """Every start fails with this message (a port in use, a foreign data directory)."""
        self.state = WorkloadState.STOPPED
        self.reason: str | None = None
        self.restarts = 0
        self.ctx: RunContext | None = None
        self.deadlines: list[Deadline | None] = []
        self.released = asyncio.Event()
        """Set to let a hanging ``apply`` return."""

    async def apply(self, ctx: RunContext) -> Outcome:
        if self.hang:
            await self.released.wait()
        self.ctx = ctx
        if self.fail is not None:
            self.log.append(f"failed {ctx.fencing_token}")
            return Outcome.failed(self.fail)
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

    def set_deadline(self, deadline: Deadline | None) -> None:
        self.deadlines.append(deadline)


@dataclass
class FakePorts:
    state_dir: Path
    agent_id: str = "site-a/n1"
    site: str = "site-a"
    node: str = "n1"
    stopping: bool = False
    timing: Timing = field(default_factory=lambda: Timing.from_ttl(2.0))
    max_failures: int = 3
    topology: Any = None
    now: float = NOW
    apps: dict[str, Application] = field(default_factory=dict)
    fences: set[str] = field(default_factory=set)
    peer_list: list[PeerInstance] = field(default_factory=list)
    events: list[tuple[str, int | None]] = field(default_factory=list)
    reports: list[InstanceReport] = field(default_factory=list)
    remembered: dict[str, int] = field(default_factory=dict)
    replica_list: list[Replica] = field(default_factory=list)
    polls: list[tuple[str, int]] = field(default_factory=list)
    leases: FakeLeases = field(init=False)

    def __post_init__(self) -> None:
        self.leases = FakeLeases(self.clock)

    def clock(self) -> float:
        return self.now

    def app(self, name: str) -> Application | None:
        return self.apps.get(name)

    def fenced(self, name: str) -> bool:
        return name in self.fences

    def drained(self) -> bool:
        return False

    def peers(self, name: str, site: str | None) -> tuple[PeerInstance, ...]:
        return tuple(self.peer_list)

    def holder(self, name: str) -> str | None:
        return None

    async def publish(self, event: str, app: str, token: int | None, **fields: Any) -> None:
        self.events.append((event, token))

    def replicas(self, name: str, sites: list[str]) -> tuple[Replica, ...]:
        return tuple(self.replica_list)

    async def poll(self, name: str, term: int) -> None:
        self.polls.append((name, term))

    def report(self, report: InstanceReport, *, urgent: bool = False) -> None:
        self.reports.append(report)

    def remember(self, app: str, token: int, pid: int | None, stop_timeout: float) -> None:
        self.remembered[app] = token

    def forget(self, app: str) -> None:
        self.remembered.pop(app, None)


def application(strategy: str = "AbsoluteConsistency") -> Application:
    return Application.model_validate(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": "ledger"},
            "spec": {
                "trait": "stateful",
                "failover": {"strategy": strategy},
                "placement": {"sites": ["site-b", "site-a"]},
                "score": {"kind": "Process", "command": ["true"]},
            },
        }
    )


@pytest.fixture
def world(tmp_path: Path) -> tuple[FakePorts, AppRunner, FakeInterpret, list[str]]:
    ports = FakePorts(tmp_path)
    ports.apps["ledger"] = application()
    runner = AppRunner("ledger", ports)
    log: list[str] = []
    interpret = FakeInterpret(log)
    runner.interpret = interpret
    runner.score = ports.apps["ledger"].spec.score
    return ports, runner, interpret, log


async def test_consistent_start_uses_token_and_the_lease_deadline(world: Any) -> None:
    ports, runner, interpret, log = world
    await runner.step()
    assert ports.leases.wants == {"ledger": 1}  # site-a is second in placement
    ports.leases.grant("ledger", 42)
    await runner.step()
    assert log == ["apply 42"] and interpret.ctx.fencing_token == 42
    assert interpret.ctx.deadline == Deadline(ports.leases.valid_until, follows_session=True)
    assert ports.remembered == {"ledger": 42}
    assert ports.reports[-1].state.value == "running" and ports.reports[-1].token == 42
    ports.leases.follows = False  # the claim stands in fewer stores: a fixed deadline
    ports.leases.valid_until += 0.7
    runner.apply_deadline()
    assert interpret.deadlines[-1] == Deadline(ports.leases.valid_until, follows_session=False)
    ports.now = ports.leases.valid_until + 0.01
    await runner.step()
    assert log[-1] == "stop" and ports.reports[-1].state.value == "standby"
    assert ("lease-lost", 42) in ports.events and ports.remembered == {}


async def test_every_renewal_reaches_an_interpret_that_does_not_follow_the_session(
    world: Any,
) -> None:
    """A Process fence reads the session's renewals itself, so the runner skips telling it
    of each one; the PostgreSQL watchdog and the systemd timer do not, and must be pushed
    forward on every renewal. Skipped renewals let the watchdog stop a healthy primary at
    its first deadline (seen: every PostgreSQL failover test lost its primary's
    connections a few seconds after promotion)."""
    ports, runner, interpret, log = world
    ports.leases.grant("ledger", 7)
    await runner.step()
    assert log == ["apply 7"]
    for _ in range(3):
        ports.leases.valid_until += 0.7  # a renewal; the lease still follows the session
        runner.apply_deadline()
    told = [d.at for d in interpret.deadlines if d is not None]
    assert told[-1] == ports.leases.valid_until, "renewals did not reach the Interpret"
    assert len(told) >= 3
    # A Process-like Interpret needs none of them after the first.
    interpret.follows_session_itself = True
    runner.apply_deadline()
    before = len(interpret.deadlines)
    ports.leases.valid_until += 0.7
    runner.apply_deadline()
    assert len(interpret.deadlines) == before


async def test_split_brain_keeps_serving_then_loses_reconcile(world: Any) -> None:
    ports, runner, interpret, log = world
    ports.apps["ledger"] = application("SplitBrainAllowed")
    runner.score = ports.apps["ledger"].spec.score
    ports.leases.grant("ledger", 5)
    await runner.step()
    assert interpret.ctx.deadline is None and log == ["apply 5"]
    ports.now = ports.leases.valid_until + 5  # partitioned: lease gone, workload stays
    await runner.step()
    report = ports.reports[-1]
    assert report.state.value == "running" and report.partitioned and report.token == 5
    assert "partitioned" in report.detail and log == ["apply 5"]
    ports.peer_list = [PeerInstance("site-b/n1", "site-b", "running", 9)]
    await runner.step()
    assert log[-1] == "stop" and ports.reports[-1].state.value == "standby"


async def test_crash_loop_gives_up_and_releases(world: Any) -> None:
    ports, runner, interpret, _log = world
    ports.leases.grant("ledger", 7, ttl=100)
    await runner.step()
    interpret.state, interpret.reason, interpret.restarts = WorkloadState.FAILED, "crashed", 2
    await runner.step()
    assert ("release", None) in ports.leases.calls and "ledger" not in ports.leases.wants
    assert runner.cooldown_until > ports.now and ports.reports[-1].state.value == "failed"
    await runner.step()
    assert "ledger" not in ports.leases.wants  # still cooling down: not contending


async def test_a_round_of_failed_starts_after_the_cooldown_backs_off_afresh(world: Any) -> None:
    """A site whose starts keep failing gives up after ``max_failures`` and lets another
    site try (each attempt reset the count, so such a site held the lease for ever); when
    its cool-down ends and it takes the lease again, its retries start at the first
    backoff (the doubled backoff carried over held the lease through 4, 8 and 16 s while a
    healthy site waited: 13 s in the PostgreSQL bad-input test)."""
    ports, runner, interpret, log = world
    interpret.fail = "port 5432 is already in use [port-in-use]"

    async def round_of_failures(token: int) -> list[float]:
        ports.leases.grant("ledger", token, ttl=1000)
        waits = []
        for _ in range(ports.max_failures):
            await runner.step()
            waits.append(runner.backoff_until - ports.now)
            ports.now = max(ports.now, runner.backoff_until) + 0.01
        await runner.step()  # the give-up
        assert ("release", None) in ports.leases.calls, f"it did not give up: {log} {waits}"
        return waits

    first = await round_of_failures(7)
    assert first == [0.5, 1.0, 2.0]
    assert log == ["failed 7"] * 3
    ports.now = runner.cooldown_until + 0.01
    await runner.step()
    assert "ledger" in ports.leases.wants, "contending again after the cool-down"
    assert await round_of_failures(8) == first


async def test_a_workload_that_crashes_after_every_start_is_given_up(world: Any) -> None:
    """Without restarts of its own (``restart: never``) each crash is followed by a new
    start from the controller; the crashes add up across those starts."""
    ports, runner, interpret, log = world
    ports.leases.grant("ledger", 7, ttl=1000)
    for _ in range(ports.max_failures):
        await runner.step()
        assert log[-1] == "apply 7"
        interpret.state, interpret.reason = WorkloadState.FAILED, "crashed"
        ports.now += 1.0
    await runner.step()
    assert ("release", None) in ports.leases.calls, f"not given up after {log}"
    assert log.count("apply 7") == ports.max_failures


async def test_an_interpret_call_is_bounded_by_the_lease_deadline(tmp_path: Path) -> None:
    """A hung start (an SSH or API call) must not hold the runner past the lease.

    The command timeout (30 s, an SSH call's) is far longer than what is left of the lease
    (200 ms): the call must be cut at the lease deadline. With a command timeout as short
    as the test's patience, a runner bounded by the command timeout alone passed too."""
    ports = FakePorts(tmp_path, timing=Timing(2.0, 0.2, command_timeout=30.0))
    ports.apps["ledger"] = application()
    runner = AppRunner("ledger", ports)
    runner.interpret = FakeInterpret([], hang=True)
    runner.score = ports.apps["ledger"].spec.score
    await runner.step()
    ports.leases.grant("ledger", 3, ttl=100)
    ports.leases.valid_until = ports.now + 0.2  # the lease ends in 200 ms
    try:
        await asyncio.wait_for(runner.step(), 5)
    except TimeoutError:
        pytest.fail("a hung start held the runner past the lease deadline")
    assert runner.start_failed is not None and "did not finish within 0.2s" in runner.start_failed


async def test_a_slow_start_under_a_renewed_lease_is_not_cut_short(tmp_path: Path) -> None:
    """The bound follows the lease as renewals move it: a start storm takes longer than
    one ttl - margin, and the lease stays valid all along (issue 17)."""
    ports = FakePorts(tmp_path, timing=Timing(2.0, 0.2, command_timeout=2.0))
    ports.apps["ledger"] = application()
    runner = AppRunner("ledger", ports)
    interpret = FakeInterpret([], hang=True)
    runner.interpret = interpret
    runner.score = ports.apps["ledger"].spec.score
    await runner.step()
    ports.leases.grant("ledger", 3, ttl=100)
    ports.leases.valid_until = ports.now + 0.2

    async def renew_then_finish() -> None:
        for _ in range(5):  # 0.5 s of renewals, each moving the lease 0.2 s on
            await asyncio.sleep(0.1)
            ports.leases.valid_until += 0.2
        interpret.hang = False
        interpret.released.set()

    helper = asyncio.create_task(renew_then_finish())
    await asyncio.wait_for(runner.step(), 5)
    await helper
    assert runner.start_failed is None and interpret.log == ["apply 3"]


async def test_shutdown_stops_then_releases(world: Any) -> None:
    ports, runner, _interpret, log = world
    ports.leases.grant("ledger", 3, ttl=100)
    await runner.step()
    await runner.shutdown()
    assert log == ["apply 3", "stop"] and ports.leases.tokens == {}
    assert ports.reports[-1].state.value == "stopped"
    ports.stopping = True
    assert await runner.step() is None  # nothing starts again once shutdown began


async def test_planned_failover_stops_before_handover(world: Any) -> None:
    ports, runner, _interpret, log = world
    ports.leases.grant("ledger", 3, ttl=100)
    await runner.step()
    ok, sentence = await runner.planned_failover("site-b")
    assert ok and "handed the lease to site-b" in sentence
    assert log == ["apply 3", "stop"] and ("release", "site-b") in ports.leases.calls
    assert ("handover", 3) in ports.events


def health_app(flag: Path, **health: Any) -> Application:
    return Application.model_validate(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": "ledger"},
            "spec": {
                "trait": "stateful",
                "placement": {"sites": ["site-b", "site-a"]},
                "score": {"kind": "Process", "command": ["true"]},
                "health": {
                    "probe": {"exec": ["test", "-f", str(flag)]},
                    "period": "200ms",
                    "timeout": "200ms",
                    "failure_threshold": 2,
                    "start_period": "0s",
                    "cooldown": "1h",
                    **health,
                },
            },
        }
    )


async def test_failing_probe_gives_up_and_a_passing_one_ends_the_cooldown(
    world: Any, tmp_path: Path
) -> None:
    from scores.health import Phase
    from tests.harness.wait import eventually
    from topologies.localhost import LocalhostTopology

    ports, runner, _interpret, log = world
    ports.topology = LocalhostTopology()
    flag = tmp_path / "healthy"
    flag.touch()
    ports.apps["ledger"] = health_app(flag)
    ports.leases.grant("ledger", 7, ttl=100)
    await runner.step()
    monitor = runner.health
    assert log == ["apply 7"] and monitor is not None and monitor.probe is not None
    await eventually(lambda: monitor.checks >= 2, what="probing")
    ports.apps["ledger"] = health_app(flag)  # the same Application, read again
    await runner.step()
    assert runner.health is monitor and ports.reports[-1].state.value == "running"

    runner.wake.clear()
    flag.unlink()  # alive but unhealthy
    await asyncio.wait_for(runner.wake.wait(), 30)  # the monitor wakes the runner
    plan = await runner.step()
    assert plan is not None and plan.give_up
    assert plan.sentence.startswith(
        "ledger: probe exec failed 2 times in a row (threshold 2): exit 1; giving it up here"
    )
    assert log[-1] == "stop" and ("release", None) in ports.leases.calls
    assert runner.cooldown_until == ports.now + 3600
    await runner.step()
    assert "ledger" not in ports.leases.wants, "out while the probe still fails"

    runner.wake.clear()
    flag.touch()
    await asyncio.wait_for(runner.wake.wait(), 30)
    assert monitor.verdict().phase is Phase.IDLE
    await runner.step()
    assert "ledger" in ports.leases.wants, "the probe passes again: contending again"
    await runner.shutdown()
    assert runner.health is None


async def test_a_violated_health_rule_keeps_the_workload_off(world: Any, tmp_path: Path) -> None:
    from topologies.localhost import LocalhostTopology

    ports, runner, _interpret, log = world
    ports.topology = LocalhostTopology()
    ports.apps["ledger"] = health_app(tmp_path / "x", cooldown="1s")  # ttl is 2s
    ports.leases.grant("ledger", 7, ttl=100)
    await runner.step()
    await runner.step()
    assert log == [] and runner.interpret is None
    assert runner.start_failed is not None
    assert "rule 'cooldown >= lease.ttl' violated" in runner.start_failed
