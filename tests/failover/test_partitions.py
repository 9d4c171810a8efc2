"""Issue 10: one site's failure never interrupts another site's applications, and a holder
site cut off while it leads every replicated stream is taken over in about one ttl.

The worst case is forced first: every replicated stream's leader and the JetStream meta
leader are moved onto the site that is then cut (``Stage.force_leaders``). Lease stores are
single-replica, one per site: there is no election on the lease path to wait for.
"""

from __future__ import annotations

import time

import pytest

from tests.failover.conftest import TTL, Stage, application, runs
from tests.harness import history
from tests.harness.wait import eventually

pytestmark = [pytest.mark.netns, pytest.mark.slow]

APP = "ledger"
SITES = ("site-a", "site-b", "site-c")
MAX_TICK_GAP_NS = 150_000_000
"""Ticks are 10 ms apart: a longer pause in one instance is an interruption."""


async def _up(stage: Stage) -> history.Instance:
    for site in SITES:
        stage.agent(site)
    await stage.all_ready()
    await stage.put(application(APP, stage.history))
    return await stage.one_running(APP, timeout=30)


@pytest.mark.parametrize("run", runs())
async def test_a_bystander_site_leading_every_stream_is_cut_and_nothing_stops(
    stage: Stage, run: int
) -> None:
    first = await _up(stage)
    bystander = next(s for s in SITES if s != first.site)
    moved = await stage.force_leaders(bystander)
    assert "meta" in moved
    stage.sites.cut(bystander)
    cut_at = time.monotonic_ns()
    await eventually(
        lambda: time.monotonic_ns() - cut_at > (2 * TTL + 5) * 1e9,
        timeout=4 * TTL + 10,
        interval=0.2,
        what="the partition to outlast a JetStream election and two ttls",
    )
    stage.sites.heal(bystander)
    healed_at = time.monotonic_ns()
    await eventually(
        lambda: time.monotonic_ns() - healed_at > TTL * 1e9, timeout=2 * TTL, what="heal + ttl"
    )
    running = stage.running_now(APP)
    insts = stage.instances(APP)
    assert len(running) == 1, f"{len(running)} running after the heal:\n" + stage.report()
    now = running[0]
    assert now.key == first.key, "the application moved:\n" + stage.report()
    assert now.max_gap_ns < MAX_TICK_GAP_NS, f"it paused for {now.max_gap_ns / 1e6:.0f} ms"
    assert len(insts) == 1 and not history.overlaps(insts), stage.report()
    holder = stage.agent_of(first)
    assert "validity ran out" not in holder.log(2_000_000), "the holder's session lapsed"


@pytest.mark.parametrize("run", runs())
async def test_a_holder_site_leading_every_stream_is_taken_over_in_about_a_ttl(
    stage: Stage, run: int
) -> None:
    first = await _up(stage)
    await stage.force_leaders(first.site)
    stage.sites.cut(first.site)
    cut_at = time.monotonic_ns()
    second = await stage.one_running(APP, not_site=first.site, timeout=10 * TTL)
    assert second.token > first.token
    took = (second.first_ns - cut_at) / 1e9
    print(f"takeover {took:.2f}s after the cut (ttl {TTL:g}s)")
    # Issue 10: p99 <= ttl + 2 s whoever leads the streams (the bench measures the
    # distribution; one run must never exceed the p99 bound).
    assert took <= TTL + 2.0, f"takeover took {took:.2f}s\n{stage.report()}"
    stage.sites.heal(first.site)
    await eventually(lambda: len(stage.running_now(APP)) == 1, timeout=30, what="one instance")
    insts = stage.instances(APP)
    assert not history.overlaps(insts), stage.report()
    old = next(i for i in insts if i.key == first.key)
    assert old.last_ns < cut_at + TTL * 1e9, "the cut-off holder ran past its lease"
