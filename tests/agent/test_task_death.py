"""Issue 9 item 6: a long-lived task that dies ends the agent with exit 1, never silently;
a control cycle that raises is retried and reported, also never silently.

A real agent (in this process, so a fault can be put into one of its tasks) on a real
3-node cluster: the lease manager's decision loop, or an application's runner, dies of an
unexpected exception. The agent must notice, shut down in order and return 1 (systemd or
the kubelet then restart it clean); carrying on with nobody deciding, while /healthz stays
green, is the failure under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from agent.app_metrics import TALLIES
from agent.controller.model import InstanceState
from agent.controller.runner import AppRunner
from agent.daemon import Agent
from mesh.names import STATE_BUCKET, instance_key
from tests.agent.conftest import in_process_agent
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually

TTL = 2.0


class Injected(RuntimeError):
    """The fault put into a task: stands for any bug."""


def app_doc(name: str) -> bytes:
    return json.dumps(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": name},
            "spec": {
                "trait": "stateful",
                "placement": {"sites": ["site-a"]},
                "score": {
                    "kind": "Process",
                    "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
                    "stop_timeout": "1s",
                },
            },
        }
    ).encode()


@pytest.fixture
async def client(mesh_client: Client) -> Client:
    return mesh_client


@pytest.fixture
async def agent(tmp_path: Path, nats_cluster: NatsCluster) -> AsyncIterator[Agent]:
    agent = in_process_agent(tmp_path / "agent", nats_cluster, TTL)
    yield agent
    # A test that failed half-way leaves its agent running: stop it, or the loop's
    # teardown waits for its session thread for ever.
    agent.stop_event.set()
    for task in asyncio.all_tasks():
        if task.get_name() == "agent-under-test":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=60)


async def _started(agent: Agent) -> asyncio.Task[int]:
    task = asyncio.create_task(agent.run(), name="agent-under-test")
    await eventually(lambda: agent.started or task.done(), timeout=30, what="agent started")
    assert not task.done(), "the agent did not start"
    return task


async def _running_ledger(agent: Agent, client: Client) -> tuple[KeyValue, AppRunner]:
    """Apply ``ledger`` and wait until it runs: its runner is then idle, waiting on its
    event (for up to its 30 s idle backstop), which is where the faults below go in."""
    kv = await client.jetstream(timeout=5).key_value(STATE_BUCKET)
    await kv.put("app.ledger", app_doc("ledger"))
    controller = agent.controller
    assert controller is not None
    runner = await eventually(
        lambda: controller.runners.get("ledger"), timeout=10, what="a runner for ledger"
    )
    assert runner is not None
    await eventually(
        lambda: runner.report.state is InstanceState.RUNNING, timeout=30, what="ledger running"
    )
    return kv, runner


EXITS_WITHIN = 30.0
"""How long the agent may take to notice and stop (about 0.1 s here): generous, because a
runner finishes the step it is in (a start or a stop, up to a few seconds on a loaded
machine) before it comes round to the broken wait; an agent that carries on never exits."""


async def _exit_code(
    agent: Agent, task: asyncio.Task[int], what: str, state: Callable[[], str] = str
) -> Any:
    """The agent's exit code once it stopped by itself; if it carries on instead, stop it
    and fail (after checking it still called itself healthy: the silent death)."""
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout=EXITS_WITHIN)
    except TimeoutError:
        healthy, seen = agent.liveness()[0], state()
        agent.stop_event.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=30)
        pytest.fail(f"{what} died and the agent carried on (liveness {healthy}; {seen})")


async def test_a_dead_lease_loop_ends_the_agent_with_exit_1(agent: Agent, client: Client) -> None:
    task = await _started(agent)
    assert agent.leases is not None

    def broken(*_: Any, **__: Any) -> Any:
        raise Injected("a bug in the lease decision loop")

    agent.leases.decide = broken  # type: ignore[method-assign]
    kv = await client.jetstream(timeout=5).key_value(STATE_BUCKET)
    await kv.put("app.ledger", app_doc("ledger"))  # wanting the lease makes the loop decide
    assert await _exit_code(agent, task, "the lease loop") == 1
    assert agent.supervisor.failure is not None and "leases" in agent.supervisor.failure
    assert "Injected" in agent.supervisor.failure


async def test_a_dead_runner_ends_the_agent_with_exit_1(agent: Agent, client: Client) -> None:
    task = await _started(agent)
    _, runner = await _running_ledger(agent, client)
    controller = agent.controller
    assert controller is not None

    class BrokenEvent(asyncio.Event):
        async def wait(self) -> Literal[True]:  # outside the runner's per-step error handling
            raise Injected("a bug in the runner loop")

    # Swap in the broken event, then wake the old one so that the loop comes round to the
    # broken wait.
    old, runner.wake = runner.wake, BrokenEvent()
    old.set()

    def state() -> str:
        return (
            f"runner in a step: {runner.lock.locked()}, done: {runner.done}, "
            f"still the runner: {controller.runners.get('ledger') is runner}, "
            f"last: {runner.last_sentence!r}"
        )

    assert await _exit_code(agent, task, "the runner", state) == 1
    assert agent.supervisor.failure is not None and "controller" in agent.supervisor.failure
    assert "Injected" in agent.supervisor.failure


async def test_a_failing_cycle_is_reported_retried_and_cleared(
    agent: Agent, client: Client
) -> None:
    """Not a dead task: one application's cycle raises, again and again. The runner carries
    on (the workload keeps running under its lease), the instance's status says why, the
    runner tries again at the control interval (not its 30 s idle backstop, with nothing
    else waking it), the counter moves, and the error clears once a cycle works again."""
    task = await _started(agent)
    kv, runner = await _running_ledger(agent, client)
    pid, token = runner.pid, runner.run_token
    before = TALLIES.app("ledger").step_failures

    async def reported_error() -> str | None:
        entry = await kv.get(instance_key("ledger", "site-a", "n1"))
        error = json.loads(entry.value or b"{}").get("error")
        return error if isinstance(error, str) else None

    def broken(*_: Any, **__: Any) -> Any:
        raise Injected("a bug in one cycle")

    runner.snapshot = broken  # type: ignore[method-assign]
    runner.wake.set()
    try:
        error = await eventually(reported_error, timeout=30, what="the error in the status")
        assert "controller step failed" in error and "Injected" in error, error
        await eventually(
            lambda: TALLIES.app("ledger").step_failures >= before + 3,
            timeout=agent.config.timing.idle_backstop / 2,
            what="the failing cycle tried again (three failures)",
        )
    finally:
        del runner.snapshot  # the class's method again: the next cycle works

    await eventually(
        lambda: runner.report.error is None, timeout=30, what="the error cleared in the runner"
    )

    async def cleared() -> bool:
        return await reported_error() is None

    await eventually(cleared, timeout=30, what="the error cleared in the status")
    assert (runner.pid, runner.run_token) == (pid, token), "the workload was restarted"
    assert runner.report.state is InstanceState.RUNNING
    assert not task.done()
    agent.stop_event.set()
    assert await asyncio.wait_for(task, timeout=60) == 0
