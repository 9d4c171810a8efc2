"""The pure lease rules (mesh.election.decide) with a fake monotonic clock: no NATS."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh.election import (
    HANDOVER,
    Action,
    LeaseObs,
    LeaseValue,
    Me,
    SessionObs,
    decide,
)
from mesh.session import SessionView

TTL = 10.0
ME = Me(agent="b/n1", site="b", session_key="agent.b.n1", epoch="eb", valid=True, ttl=TTL)


def held_by_a(session_rev: int = 5, **kw: object) -> LeaseValue:
    base = LeaseValue(
        holder="a/n1",
        session="agent.a.n1",
        epoch="ea",
        session_rev=session_rev,
        ttl=TTL,
        acquired_at="2026-01-01T00:00:00Z",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def session_a(revision: int, since: float, epoch: str = "ea", state: str = "alive") -> SessionObs:
    view = SessionView(agent="a/n1", epoch=epoch, state=state, ttl=TTL, revision=revision, data={})
    return SessionObs(revision=revision, view=view, since=since)


def lease(value: LeaseValue | None, revision: int | None = 7, since: float = 100.0) -> LeaseObs:
    return LeaseObs(revision=revision, value=value, since=since)


# --- free keys and preference ----------------------------------------------------------------


def test_absent_key_is_created_by_rank_zero_at_once() -> None:
    d = decide(lease=lease(None, revision=None), holder=None, me=ME, now=100.0, held_token=None)
    assert d.action is Action.ACQUIRE and d.last is None
    assert "free" in d.why


def test_deleted_key_is_taken_by_cas_over_the_delete_marker() -> None:
    d = decide(lease=lease(None, revision=9), holder=None, me=ME, now=100.0, held_token=None)
    assert d.action is Action.ACQUIRE and d.last == 9


def test_less_preferred_contender_defers_rank_times_step() -> None:
    obs = lease(None, revision=9, since=100.0)
    kw = {"lease": obs, "holder": None, "me": ME, "held_token": None, "step": 0.1}
    d = decide(now=100.15, rank=2, **kw)  # type: ignore[arg-type]
    assert d.action is Action.WAIT and d.retry_at == pytest.approx(100.2)
    assert "deferring" in d.why
    assert decide(now=100.2, rank=2, **kw).action is Action.ACQUIRE  # type: ignore[arg-type]


def test_nothing_is_acquired_while_our_own_session_is_invalid() -> None:
    me = replace(ME, valid=False)
    d = decide(lease=lease(None), holder=None, me=me, now=100.0, held_token=None)
    assert d.action is Action.WAIT and "not valid" in d.why


def test_unreadable_value_is_left_alone() -> None:
    obs = LeaseObs(revision=3, value=None, since=0.0, readable=False)
    d = decide(lease=obs, holder=None, me=ME, now=1e6, held_token=None)
    assert d.action is Action.WAIT


# --- takeover timing: a full ttl of *our* watching ---------------------------------------------


def test_live_holder_is_expired_only_after_a_full_ttl_unchanged_on_our_clock() -> None:
    obs = lease(held_by_a(), since=50.0)
    holder = session_a(revision=12, since=100.0)
    before = decide(lease=obs, holder=holder, me=ME, now=100.0 + TTL - 0.001, held_token=None)
    assert before.action is Action.WAIT and before.retry_at == pytest.approx(100.0 + TTL)
    at = decide(lease=obs, holder=holder, me=ME, now=100.0 + TTL, held_token=None)
    assert at.action is Action.EXPIRE
    assert at.session is not None and at.session.revision == 12


def test_a_renewal_restarts_the_takeover_timer() -> None:
    obs = lease(held_by_a())
    renewed = session_a(revision=13, since=108.0)  # watch saw a new revision at 108
    d = decide(lease=obs, holder=renewed, me=ME, now=112.0, held_token=None)
    assert d.action is Action.WAIT and d.retry_at == pytest.approx(118.0)


def test_takeover_waits_the_longer_of_holder_and_our_ttl() -> None:
    obs = lease(held_by_a())
    holder = session_a(revision=12, since=100.0)
    long_holder = replace(holder, view=replace(holder.view, ttl=30.0))  # type: ignore[type-var]
    d = decide(lease=obs, holder=long_holder, me=ME, now=100.0 + TTL + 1, held_token=None)
    assert d.action is Action.WAIT and d.retry_at == pytest.approx(130.0)


def test_wall_clock_is_never_read() -> None:
    """A wall-clock jump changes only display fields: decisions are identical."""
    holder = session_a(revision=12, since=100.0)
    for acquired_at in ("1970-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "2999-12-31T23:59:59Z"):
        obs = lease(held_by_a(acquired_at=acquired_at))
        d = decide(lease=obs, holder=holder, me=ME, now=105.0, held_token=None)
        assert d.action is Action.WAIT and d.retry_at == pytest.approx(110.0)


# --- what frees a lease ------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["expired", "closed"])
def test_ended_session_frees_its_leases(state: str) -> None:
    holder = session_a(revision=14, since=120.0, state=state)
    d = decide(lease=lease(held_by_a()), holder=holder, me=ME, now=120.0, held_token=None)
    assert d.action is Action.ACQUIRE and d.last == 7
    assert state in d.why


def test_new_epoch_of_the_holder_frees_its_old_leases() -> None:
    holder = session_a(revision=20, since=120.0, epoch="ea2")
    d = decide(lease=lease(held_by_a()), holder=holder, me=ME, now=120.0, held_token=None)
    assert d.action is Action.ACQUIRE


def test_stale_session_read_older_than_the_lease_is_not_trusted() -> None:
    """A lagging replica shows an *older* epoch: that must not free the lease."""
    holder = session_a(revision=3, since=120.0, epoch="e-older")
    d = decide(lease=lease(held_by_a(5)), holder=holder, me=ME, now=1e6, held_token=None)
    assert d.action is Action.WAIT and "older than the lease" in d.why


def test_unseen_holder_session_means_wait() -> None:
    d = decide(lease=lease(held_by_a()), holder=None, me=ME, now=1e6, held_token=None)
    assert d.action is Action.WAIT


def test_deleted_session_key_frees_the_lease() -> None:
    holder = SessionObs(revision=30, view=None, since=120.0)
    d = decide(lease=lease(held_by_a()), holder=holder, me=ME, now=120.0, held_token=None)
    assert d.action is Action.ACQUIRE


# --- handover --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["b/n1", "b"])
def test_handover_target_takes_it_at_once_even_with_a_bad_rank(target: str) -> None:
    obs = lease(held_by_a(state=HANDOVER, handover_to=target), since=100.0)
    d = decide(lease=obs, holder=None, me=ME, now=100.0, held_token=None, rank=5)
    assert d.action is Action.ACQUIRE and "handed over to us" in d.why


def test_others_wait_the_handover_window() -> None:
    obs = lease(held_by_a(state=HANDOVER, handover_to="c"), since=100.0)
    kw = {"lease": obs, "holder": None, "me": ME, "held_token": None, "handover_window": 3.0}
    assert decide(now=102.9, **kw).action is Action.WAIT  # type: ignore[arg-type]
    assert decide(now=103.0, **kw).action is Action.ACQUIRE  # type: ignore[arg-type]


# --- the holder's side -----------------------------------------------------------------------


def ours(revision: int = 7) -> LeaseObs:
    value = replace(held_by_a(), holder="b/n1", session="agent.b.n1", epoch="eb")
    return lease(value, revision=revision)


def test_holder_keeps_it_while_valid_and_loses_it_the_moment_it_is_not() -> None:
    assert decide(lease=ours(), holder=None, me=ME, now=1.0, held_token=7).action is Action.HOLD
    invalid = replace(ME, valid=False)
    d = decide(lease=ours(), holder=None, me=invalid, now=1.0, held_token=7)
    assert d.action is Action.LOST and d.token == 7


def test_holder_notices_a_rewrite_but_ignores_a_lagging_watch() -> None:
    taken = lease(held_by_a(), revision=9)
    d = decide(lease=taken, holder=None, me=ME, now=1.0, held_token=7)
    assert d.action is Action.LOST and "rewritten" in d.why
    lagging = lease(held_by_a(), revision=4)
    assert decide(lease=lagging, holder=None, me=ME, now=1.0, held_token=7).action is Action.HOLD


def test_our_unanswered_write_is_adopted() -> None:
    d = decide(lease=ours(11), holder=None, me=ME, now=1.0, held_token=None)
    assert d.action is Action.HOLD and d.token == 11 and "adopting" in d.why


def test_lease_value_round_trip_and_garbage() -> None:
    value = held_by_a(state=HANDOVER, handover_to="c")
    assert LeaseValue.parse(value.encode()) == value
    assert LeaseValue.parse(b"{not json") is None
    assert LeaseValue.parse(b'{"holder": "x"}') is None
    assert LeaseValue.parse(None) is None
