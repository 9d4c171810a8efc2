"""Roles of a replicated application, one situation per test (pure, plain numbers)."""

from __future__ import annotations

from dataclasses import replace

from agent.controller.decide import decide
from agent.controller.model import (
    Event,
    InstanceState,
    LeaseView,
    Plan,
    Release,
    Replica,
    Roles,
    Run,
    Snapshot,
    WorkloadView,
)
from agent.controller.roles import (
    candidate,
    floor,
    ineligible,
    primary,
    promoting,
    switchover_target,
)

NOW = 100.0
ME = "site-a/n1"
MIB = 1024 * 1024
HELD = LeaseView(held=True, token=42, deadline=NOW + 1.5, holder=ME)


def rep(agent: str = ME, role: str | None = "replica", **kw: object) -> Replica:
    base = Replica(agent, role, True, 10 * MIB, 1, 0, host=agent[:6], port=5432, name=agent[:6])
    return replace(base, **kw)  # type: ignore[arg-type]


B = rep("site-b/n1")
C = rep("site-c/n1")
NO_DATA = rep(role=None, running=False, position=None, timeline=None)


def plan(
    local: Replica,
    peers: tuple[Replica, ...] = (),
    *,
    lease: LeaseView | None = None,
    workload: WorkloadView | None = None,
    **roles: object,
) -> Plan:
    r = replace(Roles(local=local, peers=peers, held_since=NOW - 0.1), **roles)  # type: ignore[arg-type]
    s = Snapshot(
        now=NOW,
        agent=ME,
        site="site-a",
        present=True,
        eligible=True,
        consistent=True,
        lease=lease or LeaseView(),
        workload=workload or WorkloadView(running=local.running),
        roles=r,
    )
    return decide("ledger", s)


# --- the first primary ---------------------------------------------------------------------


def test_nobody_has_data_everybody_contends_and_the_holder_initialises() -> None:
    d = plan(NO_DATA, (replace(NO_DATA, agent="site-b/n1"),))
    assert d.want and d.run is Run.KEEP and "contending to initialise" in d.sentence
    d = plan(NO_DATA, (replace(NO_DATA, agent="site-b/n1", name="b"),), lease=HELD)
    assert d.run is Run.START_PRIMARY and d.deadline and d.event is Event.STARTED
    assert d.sync_standbys == ("b",)
    assert (
        d.sentence == "ledger: acquired lease token 42, initialising the first primary on site-a/n1"
    )


def test_a_holder_without_data_hands_over_to_a_live_instance_that_has_some() -> None:
    d = plan(NO_DATA, (B, replace(C, position=20 * MIB)), lease=HELD)
    assert d.release is Release.HANDOVER and d.handover_to == "site-c/n1" and not d.want
    assert d.run is Run.KEEP


def test_no_empty_cluster_while_the_mesh_saw_data() -> None:
    """Every instance with data is down (stale reports): initialising would lose it all."""
    d = plan(NO_DATA, (replace(B, live=False, running=False),), lease=HELD)
    assert d.run is Run.KEEP and d.release is Release.RELEASE and not d.want
    assert d.event is Event.NOT_PROMOTED and "not initialising an empty cluster" in d.sentence
    follower = plan(NO_DATA, (replace(B, live=False, running=False),))
    assert not follower.want and "waiting for a primary to copy from" in follower.sentence


# --- the holder ------------------------------------------------------------------------------


def test_the_primary_keeps_running_with_its_synchronous_replicas() -> None:
    me = rep(role="primary", token=42)
    d = plan(me, (B, C), lease=HELD, workload=WorkloadView(running=True, token=42))
    assert d.run is Run.KEEP and d.want and d.deadline and d.state is InstanceState.RUNNING
    assert d.sync_standbys == ("site-b", "site-c") and d.event is None
    assert "at" not in d.sentence.split("(")[1], "steady sentences carry no position"


def test_a_primary_running_with_an_older_token_is_taken_over_with_the_new_one() -> None:
    me = rep(role="primary", token=7)
    d = plan(me, (B,), lease=HELD, workload=WorkloadView(running=True, token=7))
    assert d.run is Run.START_PRIMARY and d.deadline


def test_a_primary_whose_state_cannot_be_read_keeps_the_lease() -> None:
    """A failed status query must not look like "no data" and hand the lease away."""
    unknown = replace(NO_DATA, running=False)
    d = plan(unknown, (B,), lease=HELD, workload=WorkloadView(running=True, token=42))
    assert d.release is Release.NONE and d.want and d.run is Run.KEEP


def test_stopped_data_is_first_started_as_a_standby_alone() -> None:
    d = plan(rep(role="primary", running=False), (B,), lease=HELD)
    assert d.run is Run.START_REPLICA and d.primary is None and d.want


def test_a_new_holder_polls_the_live_replicas_before_promoting() -> None:
    dead = replace(C, live=False)
    d = plan(rep(), (B, dead), lease=HELD)
    assert d.run is Run.POLL and d.want and "asking site-b/n1" in d.sentence
    assert d.retry_at is not None and d.retry_at <= NOW + 0.25


def test_the_replica_promotes_once_every_live_replica_answered() -> None:
    d = plan(rep(), (replace(B, answered=42),), lease=HELD)
    assert d.run is Run.PROMOTE and d.deadline and d.event is Event.PROMOTED
    assert d.sync_standbys == ("site-b",)


def test_a_silent_replica_delays_the_promotion_by_poll_wait_only() -> None:
    d = plan(rep(), (B,), lease=HELD, held_since=NOW - 5.0)
    assert d.run is Run.PROMOTE and "1 did not answer" in d.sentence


def test_a_replica_that_reached_further_gets_the_lease() -> None:
    ahead = replace(B, position=10 * MIB + 1, answered=42)
    d = plan(rep(), (ahead, replace(C, answered=42)), lease=HELD)
    assert d.release is Release.HANDOVER and d.handover_to == "site-b/n1" and not d.want
    assert d.run is Run.KEEP
    equal = plan(rep(), (replace(B, answered=42),), lease=HELD)
    assert equal.run is Run.PROMOTE, "a tie stays with the holder (placement rank decided)"
    old_answer = plan(rep(), (replace(B, position=11 * MIB, answered=41),), lease=HELD)
    assert old_answer.run is Run.POLL, "an answer to an older poll proves nothing"


def test_a_replica_lagging_beyond_the_bound_is_not_promoted_and_says_why() -> None:
    stale_primary = rep("site-c/n1", "primary", running=False, live=False, position=12 * MIB)
    d = plan(rep(), (stale_primary,), lease=HELD)
    assert d.run is Run.KEEP and d.release is Release.RELEASE and not d.want
    assert d.event is Event.NOT_PROMOTED
    assert d.sentence == (
        "ledger: not promoting the replica on site-a/n1: it is 2097152 bytes behind "
        "site-c/n1's last reported position 0/C00000 (maximum_lag_on_failover 1048576)"
    )
    ok = plan(rep(), (stale_primary,), lease=HELD, max_lag=4 * MIB)
    assert ok.run is Run.PROMOTE


def test_an_older_timeline_is_never_promoted_over_a_newer_one() -> None:
    newer = rep("site-c/n1", "primary", running=False, live=False, timeline=2, position=1)
    d = plan(rep(), (newer,), lease=HELD, max_lag=100 * MIB)
    assert d.release is Release.RELEASE and "timeline 1, site-c/n1 reported timeline 2" in (
        d.sentence
    )


# --- the others ------------------------------------------------------------------------------


def test_a_primary_without_a_valid_lease_is_demoted_to_the_new_primary() -> None:
    me = rep(role="primary", token=42)
    new = rep("site-b/n1", "primary", token=43)
    d = plan(me, (new,), workload=WorkloadView(running=True, token=42))
    assert d.run is Run.DEMOTE and d.primary == new and d.event is Event.LEASE_LOST
    assert not d.want
    alone = plan(me, (), workload=WorkloadView(running=True, token=42))
    assert alone.run is Run.DEMOTE and alone.primary is None
    assert "stopped until a primary is known" in alone.sentence


def test_a_replica_without_data_copies_from_the_primary() -> None:
    prim = rep("site-b/n1", "primary", token=43)
    d = plan(NO_DATA, (prim,))
    assert d.run is Run.START_REPLICA and d.primary == prim and d.event is Event.FOLLOWING


def test_stopped_data_rejoins_the_primary_or_starts_alone() -> None:
    prim = rep("site-b/n1", "primary", token=43)
    d = plan(rep(role="primary", running=False), (prim,))
    assert d.run is Run.START_REPLICA and d.primary == prim
    alone = plan(rep(running=False), ())
    assert alone.run is Run.START_REPLICA and alone.primary is None


def test_a_running_replica_is_pointed_to_each_new_primary_once() -> None:
    prim = rep("site-b/n1", "primary", token=43)
    d = plan(rep(), (prim,))
    assert d.run is Run.START_REPLICA and d.primary == prim
    steady = plan(rep(), (prim,), following=("site-b/n1", 43))
    assert steady.run is Run.KEEP and steady.want and steady.sync_standbys == ("site-b",)
    newer = plan(rep(), (prim, rep("site-c/n1", "primary", token=44)), following=("site-b/n1", 43))
    assert newer.run is Run.START_REPLICA and newer.primary is not None
    assert newer.primary.agent == "site-c/n1"


def test_a_replica_points_to_the_holder_that_polls_before_its_promotion() -> None:
    holder = replace(B, polling=44)
    d = plan(rep(), (holder,))
    assert d.run is Run.START_REPLICA and d.primary is not None
    assert (d.primary.agent, d.primary.token) == ("site-b/n1", 44)
    assert plan(rep(), (holder,), pointed="site-b/n1").run is Run.KEEP


def test_a_stale_primary_report_is_not_followed() -> None:
    old = rep("site-b/n1", "primary", token=43)
    newer_but_down = rep("site-c/n1", "primary", token=44, live=False, running=False)
    assert primary([old, newer_but_down]) is None
    assert primary([old]) == old


def test_candidates_lagging_or_behind_a_live_better_replica_do_not_contend() -> None:
    r = Roles(local=rep(), peers=(rep("site-c/n1", "primary", live=False, position=13 * MIB),))
    want, why = candidate(rep(), r)
    assert not want and "by more than maximum_lag_on_failover" in why
    r = Roles(local=rep(), peers=(replace(B, position=10 * MIB + 5),))
    want, why = candidate(rep(), r)
    assert not want and why == "not contending: site-b/n1 reached further"
    r = Roles(
        local=rep(), peers=(replace(B, position=10 * MIB + 5), rep("x/n1", "primary", token=1))
    )
    assert candidate(rep(), r)[0], "while a primary lives, every eligible replica contends"
    assert candidate(rep(), Roles(local=rep(), peers=(B,)))[0]


def test_floor_counts_stale_reports_and_timelines_first() -> None:
    reports = [rep(position=5), rep("b/n1", timeline=2, position=1, live=False), rep("c/n1")]
    top = floor(reports)
    assert top is not None and top.agent == "b/n1"
    assert ineligible(rep(position=None), top, MIB) == "its position is unknown"
    assert promoting([replace(B, polling=9)]) == replace(B, polling=9, token=9)
    assert promoting([replace(B, polling=9, live=False)]) is None


def test_a_failed_role_change_waits_for_its_backoff() -> None:
    prim = rep("site-b/n1", "primary", token=43)
    s = Snapshot(
        now=NOW,
        agent=ME,
        site="site-a",
        present=True,
        eligible=True,
        consistent=True,
        workload=WorkloadView(start_failed="port-in-use"),
        backoff_until=NOW + 2,
        roles=Roles(local=NO_DATA, peers=(prim,)),
    )
    d = decide("ledger", s)
    assert d.run is Run.KEEP and d.state is InstanceState.FAILED and d.retry_at == NOW + 2
    assert "start-replica on site-a/n1 failed (port-in-use)" in d.sentence


def test_switchover_picks_a_close_replica_at_the_first_site_that_has_one() -> None:
    me = rep(role="primary", position=10 * MIB)
    peers = [rep("site-b/n1", position=8 * MIB), rep("site-c/n1", position=10 * MIB)]
    assert switchover_target(me, peers, ["site-c", "site-b"], MIB) == ("site-c/n1", "")
    target, why = switchover_target(me, peers, ["site-b"], MIB)
    assert target is None and why == (
        "site-b/n1 is 2097152 bytes behind (maximum_lag_on_failover 1048576)"
    )
    assert switchover_target(me, peers, ["site-d"], MIB) == (None, "no replica runs on site-d")
