"""The holder's site is cut off (network namespaces): it stops believing before anyone can
take over, the majority elects a new holder, and after the heal the old one follows.

Holder and contender are separate processes in different namespaces; CLOCK_MONOTONIC is
shared by the whole machine, so their validity intervals are directly comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness.netns import Sites
from tests.harness.wait import eventually
from tests.mesh.holder_proc import holder_argv, read_events
from tests.mesh.lease_world import Interval, check_history

pytestmark = pytest.mark.netns
TTL = 3.0


def intervals(events: list[dict[str, Any]], who: str) -> list[Interval]:
    """Tenures from a holder's event log; an open one ends at its last known deadline."""
    out: list[Interval] = []
    current: dict[str, Any] | None = None
    deadline = float("-inf")
    for e in events:
        if e["ev"] == "acquired":
            current, deadline = e, e["deadline"]
        elif e["ev"] == "renewed":
            deadline = max(deadline, e["deadline"])
        elif e["ev"] == "lost" and current is not None:
            out.append(Interval(e["lease"], who, e["token"], current["t"], e["end"]))
            current = None
    if current is not None:
        end = max(current["t"], deadline)
        out.append(Interval(current["lease"], who, current["token"], current["t"], end))
    return out


async def test_cut_off_holder_stops_before_the_majority_takes_over(
    netns_sites: Sites, tmp_path: Path
) -> None:
    opts = ("--ttl", str(TTL), "--margin", "0.3", "--lease", "ledger")
    a_events, b_events = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    local = netns_sites["site-a"].local_url
    netns_sites.spawn(
        "site-a", holder_argv([local], "site-a", a_events, *opts), log=tmp_path / "a.log"
    )
    first = await eventually(
        lambda: read_events(a_events, "acquired"), timeout=40, what="site-a acquires"
    )
    netns_sites.spawn(
        "site-b",
        holder_argv([local], "site-b", b_events, *opts, "--rank", "1"),
        log=tmp_path / "b.log",
    )
    await eventually(lambda: read_events(b_events, "ready"), timeout=40, what="site-b ready")
    assert read_events(b_events, "acquired") == []  # a healthy holder is not pre-empted

    netns_sites.cut("site-a")
    lost = await eventually(
        lambda: read_events(a_events, "lost"), timeout=3 * TTL, what="cut-off holder reports lost"
    )
    took = await eventually(
        lambda: read_events(b_events, "acquired"), timeout=40, what="majority takes over"
    )
    assert lost[0]["t"] < took[0]["t"], "the cut-off holder still believed at takeover"
    assert lost[0]["end"] <= took[0]["t"]
    assert took[0]["token"] > first[0]["token"]

    netns_sites.heal("site-a")
    healed_renewals = len(read_events(b_events, "renewed"))
    await eventually(
        lambda: any(r["sent"] > lost[0]["t"] for r in read_events(a_events, "renewed")),
        timeout=40,
        what="site-a back in the mesh with a new session",
    )
    await eventually(
        lambda: len(read_events(b_events, "renewed")) >= healed_renewals + 3,
        timeout=20,
        what="site-b keeps renewing",
    )
    # After the heal the old holder is a follower: it never takes the lease back from a live
    # holder. It may win it again only after site-b lost it on its own (a JetStream leader
    # election right after the heal can stall renewals longer than this test's 3 s ttl).
    b_lost = [e["t"] for e in read_events(b_events, "lost")]
    for again in read_events(a_events, "acquired")[1:]:
        assert any(t <= again["t"] for t in b_lost), "old holder took the lease back"
    check_history(
        intervals(read_events(a_events), "site-a") + intervals(read_events(b_events), "site-b")
    )
