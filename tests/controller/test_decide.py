"""The controller's rule book, one situation per test, with a fake clock (plain numbers)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.controller.decide import decide, preferred, winner
from agent.controller.model import (
    InstanceState,
    LeaseView,
    PeerInstance,
    Policy,
    Release,
    Run,
    Snapshot,
    WorkloadView,
)

NOW = 100.0
ME = "site-a/n1"


def snap(**kw: object) -> Snapshot:
    base = Snapshot(now=NOW, agent=ME, site="site-a", present=True, eligible=True, consistent=True)
    return replace(base, **kw)  # type: ignore[arg-type]


HELD = LeaseView(held=True, token=42, deadline=NOW + 1.5, holder=ME)
EXPIRED = LeaseView(held=True, token=42, deadline=NOW - 0.01, holder=ME)
OTHER = LeaseView(held=False, token=50, holder="site-b/n1")
RUNNING_42 = WorkloadView(running=True, token=42)
RUNNING_7 = WorkloadView(running=True, token=7)


def test_acquired_lease_starts_with_a_sentence() -> None:
    d = decide("ledger", snap(lease=HELD))
    assert d.run is Run.START and d.want and d.event == "started"
    assert d.state is InstanceState.RUNNING
    assert d.sentence == "ledger: acquired lease token 42, starting on site-a/n1"


def test_holder_keeps_running_quietly() -> None:
    d = decide("ledger", snap(lease=HELD, workload=RUNNING_42))
    assert d.run is Run.KEEP and d.event is None and d.state is InstanceState.RUNNING


def test_standby_wants_the_lease_and_keeps_stopped() -> None:
    d = decide("ledger", snap(lease=OTHER))
    assert d.want and d.run is Run.STOP and d.state is InstanceState.STANDBY
    assert "held by site-b/n1" in d.sentence


@pytest.mark.parametrize("lease", [EXPIRED, OTHER, LeaseView()])
def test_consistent_stops_without_a_valid_lease(lease: LeaseView) -> None:
    """Held but past its deadline on our clock counts as not held (paused agent resumes)."""
    d = decide("ledger", snap(lease=lease, workload=RUNNING_42))
    assert d.run is Run.STOP and d.event == "lease-lost"


def test_resumed_agent_with_expired_lease_does_not_restart() -> None:
    """After SIGSTOP the guard killed the workload at the deadline; nothing starts again."""
    dead = WorkloadView(running=False, failed=True, reason="deadline")
    d = decide("ledger", snap(lease=EXPIRED, workload=dead))
    assert d.run is Run.STOP and d.state is InstanceState.STANDBY


def test_split_brain_keeps_serving_without_lease() -> None:
    d = decide("cache", snap(consistent=False, lease=LeaseView(), workload=RUNNING_42))
    assert d.run is Run.KEEP and d.want and d.state is InstanceState.RUNNING
    assert d.event == "partitioned" and "partitioned" in d.sentence


@pytest.mark.parametrize(
    ("policy", "mine", "theirs", "i_stop"),
    [
        (Policy.KEEP_NEWEST, 7, 42, True),
        (Policy.KEEP_NEWEST, 42, 7, False),
        (Policy.KEEP_OLDEST, 7, 42, False),
        (Policy.KEEP_OLDEST, 42, 7, True),
    ],
)
def test_reconcile_after_heal(policy: Policy, mine: int, theirs: int, i_stop: bool) -> None:
    peer = PeerInstance("site-b/n1", "site-b", "running", theirs)
    d = decide(
        "cache",
        snap(
            consistent=False,
            policy=policy,
            lease=LeaseView(),
            workload=WorkloadView(running=True, token=mine),
            peers=(peer,),
        ),
    )
    assert (d.run is Run.STOP) is i_stop
    if i_stop:
        assert d.event == "reconciled" and f"keeps token {theirs}" in d.sentence


def test_reconcile_loser_holding_the_lease_hands_it_to_the_winner() -> None:
    """keep-oldest: the new holder stops and hands its lease to the old survivor."""
    peer = PeerInstance("site-a/n9", "site-a", "running", 7)
    d = decide(
        "cache",
        snap(
            consistent=False,
            policy=Policy.KEEP_OLDEST,
            lease=HELD,
            workload=RUNNING_42,
            peers=(peer,),
        ),
    )
    assert d.run is Run.STOP and d.handover_to == "site-a/n9" and d.release is Release.HANDOVER


def test_reconcile_ignores_standby_peers() -> None:
    peer = PeerInstance("site-b/n1", "site-b", "standby", 99)
    d = decide("cache", snap(consistent=False, lease=HELD, workload=RUNNING_42, peers=(peer,)))
    assert d.run is Run.KEEP


def test_split_brain_standby_does_not_contend_while_a_peer_runs() -> None:
    peer = PeerInstance("site-b/n1", "site-b", "running", 5)
    d = decide("cache", snap(consistent=False, lease=LeaseView(), peers=(peer,)))
    assert not d.want and d.run is Run.STOP


def test_consistent_standby_contends_whatever_heartbeats_say() -> None:
    """Heartbeats may be stale; only the lease decides under AbsoluteConsistency."""
    peer = PeerInstance("site-b/n1", "site-b", "running", 5)
    d = decide("ledger", snap(lease=LeaseView(), peers=(peer,)))
    assert d.want


def test_new_token_under_consistency_restarts_fenced() -> None:
    d = decide("ledger", snap(lease=HELD, workload=RUNNING_7))
    assert d.run is Run.STOP and d.event == "restarting"


@pytest.mark.parametrize(
    ("kw", "state", "event"),
    [
        ({"present": False, "eligible": False}, InstanceState.STOPPED, "stopped"),
        ({"eligible": False}, InstanceState.STOPPED, "stopped"),
        ({"fenced": True}, InstanceState.FENCED, "fenced"),
        ({"drained": True}, InstanceState.STANDBY, "drained"),
        ({"cooldown_until": NOW + 5}, InstanceState.FAILED, "gave-up"),
    ],
)
def test_not_wanted_here_stops_and_releases(
    kw: dict[str, object], state: InstanceState, event: str
) -> None:
    d = decide("ledger", snap(lease=HELD, workload=RUNNING_42, **kw))
    assert not d.want and d.run is Run.STOP and d.release is not Release.NONE
    assert d.state is state and d.event == event


def test_not_wanted_and_idle_is_quiet() -> None:
    d = decide("ledger", snap(drained=True))
    assert not d.want and d.release is Release.NONE and d.event is None


def test_max_failures_gives_up_and_releases() -> None:
    d = decide("ledger", snap(lease=HELD, failures=3, max_failures=3))
    assert d.give_up and d.release is Release.RELEASE and not d.want
    assert d.state is InstanceState.FAILED
    assert "failed 3 times" in d.sentence


def test_backoff_after_failed_start() -> None:
    failed = WorkloadView(start_failed="cannot start: no such file")
    d = decide("ledger", snap(lease=HELD, workload=failed, backoff_until=NOW + 1))
    assert d.run is Run.KEEP and d.state is InstanceState.FAILED and d.want
    assert d.retry_at == NOW + 1 and "no such file" in d.sentence
    d = decide("ledger", snap(lease=HELD, workload=failed, backoff_until=NOW - 0.1))
    assert d.run is Run.START


def test_crashed_standby_reports_failed() -> None:
    crashed = WorkloadView(running=False, failed=True, reason="crashed")
    assert decide("ledger", snap(workload=crashed)).state is InstanceState.FAILED


def test_valid_lease_but_older_survivor_elsewhere_hands_over() -> None:
    peer = PeerInstance("site-c/n1", "site-c", "running", 3)
    d = decide(
        "cache", snap(consistent=False, policy=Policy.KEEP_OLDEST, lease=HELD, peers=(peer,))
    )
    assert d.handover_to == "site-c/n1" and d.run is Run.STOP


def test_preferred_is_a_total_order() -> None:
    assert preferred(5, "a", 4, "b", Policy.KEEP_NEWEST)
    assert preferred(4, "a", 5, "b", Policy.KEEP_OLDEST)
    assert preferred(5, "a", 5, "b", Policy.KEEP_NEWEST)
    assert not preferred(5, "b", 5, "a", Policy.KEEP_NEWEST)
    assert not preferred(None, "a", 1, "b", Policy.KEEP_NEWEST)
    assert preferred(1, "a", None, "b", Policy.KEEP_OLDEST)


def test_winner_among_many() -> None:
    peers = [
        PeerInstance("b", "site-b", "running", 9),
        PeerInstance("c", "site-c", "running", 12),
        PeerInstance("d", "site-d", "standby", 99),
    ]
    w = winner(10, "a", peers, Policy.KEEP_NEWEST)
    assert w is not None and w.agent == "c"
    assert winner(13, "a", peers, Policy.KEEP_NEWEST) is None
    w = winner(10, "a", peers, Policy.KEEP_OLDEST)
    assert w is not None and w.agent == "b"


def test_an_unhealthy_probe_gives_the_application_up_here() -> None:
    d = decide("ledger", snap(lease=HELD, workload=RUNNING_42, unhealthy="probe failed 3 times"))
    assert d.give_up and d.run is Run.STOP and d.release is Release.RELEASE and not d.want
    assert d.state is InstanceState.FAILED and "probe failed 3 times" in d.sentence


def test_cooldown_asks_to_be_woken_at_its_end() -> None:
    d = decide("ledger", snap(cooldown_until=NOW + 5))
    assert not d.want and d.retry_at == NOW + 5 and d.state is InstanceState.FAILED


def test_events_report_the_token_of_what_they_concern() -> None:
    start = decide("ledger", snap(lease=HELD))
    assert start.event == "started" and start.event_token == 42 and start.deadline
    stop = decide("ledger", snap(lease=OTHER, workload=RUNNING_7))
    assert stop.event == "lease-lost" and stop.event_token == 7  # the stopped instance's
    sba = decide("cache", snap(consistent=False, lease=HELD))
    assert sba.run is Run.START and not sba.deadline  # SplitBrainAllowed: no deadline


def test_a_deleted_application_is_done_once_nothing_runs_or_is_wanted() -> None:
    busy = decide("ledger", snap(present=False, eligible=False, workload=RUNNING_42))
    assert not busy.done and busy.run is Run.STOP
    idle = decide("ledger", snap(present=False, eligible=False))
    assert idle.done
    still_wanted = decide("ledger", snap(present=False, eligible=False, wanted=True))
    assert not still_wanted.done
