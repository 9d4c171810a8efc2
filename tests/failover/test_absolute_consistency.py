"""AbsoluteConsistency (CP) on real agents in three netns sites: never two at once.

Correctness here is "zero overlapping intervals in the tick history" plus an eventual
single holder; timings are not asserted (they are measured by ``bench/app_failover.py``).
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.failover.conftest import NOW_SLACK_NS, TTL, Stage, application, runs
from tests.harness import history
from tests.harness.wait import eventually

pytestmark = [pytest.mark.netns, pytest.mark.slow]

APP = "ledger"


async def _three_agents_and_app(stage: Stage) -> history.Instance:
    for site in ("site-a", "site-b", "site-c"):
        stage.agent(site)
    await stage.all_ready()
    await stage.put(application(APP, stage.history))
    return await stage.one_running(APP, timeout=30)


def _stopped(stage: Stage, inst: history.Instance) -> int | None:
    """When ``inst`` stopped ticking, or None while it still runs."""
    now = next(i for i in stage.instances(APP) if i.key == inst.key)
    return now.last_ns if time.monotonic_ns() - now.last_ns > NOW_SLACK_NS else None


async def _standby_after(stage: Stage, site: str, holder: history.Instance) -> None:
    """The agent on ``site`` (which ran ``APP`` before it was cut off or paused) reports
    standby while ``holder`` (the majority's instance) runs: it rejoined as a follower."""
    agent = next(a for a in stage.agents.values() if a.site == site)

    async def probe() -> bool:
        inst = await stage.instance(agent, APP)
        return inst is not None and inst["state"] == "standby"

    await eventually(probe, timeout=60, interval=0.2, what=f"{site} standby after heal")
    assert _stopped(stage, holder) is None, "the majority's holder stopped:\n" + stage.report()


@pytest.mark.parametrize("run", runs())
async def test_holder_site_cut_off(stage: Stage, run: int) -> None:
    first = await _three_agents_and_app(stage)
    stage.sites.cut(first.site)
    cut_at = time.monotonic_ns()
    second = await stage.one_running(APP, not_site=first.site, timeout=30 + 2 * TTL)
    assert second.token > first.token
    stage.sites.heal(first.site)
    await _standby_after(stage, first.site, second)
    await eventually(lambda: len(stage.running_now(APP)) == 1, timeout=30, what="one instance")
    insts = stage.instances(APP)
    assert not history.overlaps(insts), stage.report()
    # The old site never pre-empts the running holder: it may only start again after the
    # majority's instance stopped on its own.
    ended = _stopped(stage, second)
    again = [i for i in insts if i.site == first.site and i.first_ns > cut_at]
    assert all(ended is not None and i.first_ns > ended for i in again), (
        "the old site started again while the majority's holder ran:\n" + stage.report()
    )


@pytest.mark.parametrize("run", runs())
async def test_holder_agent_paused(stage: Stage, run: int) -> None:
    first = await _three_agents_and_app(stage)
    holder = stage.agent_of(first)
    holder.signal(signal.SIGSTOP)
    try:
        paused_at = time.monotonic_ns()
        await asyncio.sleep(3 * TTL)  # the scenario: a pause of 3 x ttl
        second = await stage.one_running(APP, not_site=first.site, timeout=30)
    finally:
        holder.signal(signal.SIGCONT)
    await _standby_after(stage, first.site, second)
    insts = stage.instances(APP)
    assert not history.overlaps(insts), stage.report()
    assert second.token > first.token
    # The paused agent's workload must have stopped by its lease deadline, at most one ttl
    # after the pause (read its real last tick now, not the snapshot from before the pause).
    last = next(i for i in insts if i.key == first.key).last_ns
    assert last < paused_at + int(TTL * 1e9), "ran past the lease deadline"
    restarted = [i for i in insts if i.site == first.site and i.first_ns > paused_at]
    assert restarted == [], "the paused agent restarted its workload:\n" + stage.report()


@pytest.mark.parametrize("run", runs())
async def test_quorum_lost_everything_stops(stage: Stage, run: int) -> None:
    first = await _three_agents_and_app(stage)
    down = [s for s in ("site-a", "site-b", "site-c") if s != first.site]
    for site in down:
        node = stage.sites[site].nats
        assert node is not None
        node.kill()
    await eventually(
        lambda: not stage.running_now(APP), timeout=10 * TTL, what="no instance without quorum"
    )
    stopped_at = time.monotonic_ns()
    for site in down:
        node = stage.sites[site].nats
        assert node is not None
        node.start()
    await stage.one_running(APP, timeout=90)
    insts = stage.instances(APP)
    assert not history.overlaps(insts), stage.report()
    assert len(stage.running_now(APP)) == 1
    assert all(i.last_ns <= stopped_at for i in insts if i.first_ns <= stopped_at)
