"""The lease rules over a quorum of stores, one situation per test, with plain-number clocks."""

from __future__ import annotations

from mesh.election import (
    Action,
    ClaimObs,
    FamilyObs,
    Held,
    Kind,
    Me,
    SessionObs,
    classify,
    decide,
)
from mesh.records import ClaimRecord, ClaimState

NOW = 100.0
TTL = 2.0
ME = Me("site-b/n1", "site-b", {"a": "eb-a", "b": "eb-b", "c": "eb-c"}, True, TTL)
STORES = ("a", "b", "c")


def claim(agent: str, seq: int, term: int = 7, **kw: object) -> ClaimObs:
    epoch = f"e{agent[5]}-" if agent != ME.agent else "eb-"
    return ClaimObs(agent, seq, NOW - 10, ClaimRecord(kw.pop("epoch", epoch), term, **kw))  # type: ignore[arg-type]


def alive(agent: str, store: str, since: float = NOW - 0.5) -> SessionObs:
    return SessionObs(5, since, f"e{agent[5]}-{store}", True, TTL)


def held_by(agent: str, *, since: float = NOW - 0.5, term: int = 7) -> dict[str, FamilyObs]:
    out = {}
    for s in STORES:
        c = ClaimObs(agent, 10, NOW - 10, ClaimRecord(f"e{agent[5]}-{s}", term))
        out[s] = FamilyObs(s, True, 10, NOW - 10, (c,), {agent: alive(agent, s, since)})
    return out


def empty(since: float = NOW - 10) -> dict[str, FamilyObs]:
    return {s: FamilyObs(s, True, 0, since) for s in STORES}


def run(families: dict[str, FamilyObs], **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"n": 3, "me": ME, "now": NOW, "held": None, "floor": 0}
    args.update(kw)
    return decide(families=families, **args)  # type: ignore[arg-type]


def test_a_free_quorum_is_acquired_with_the_next_term() -> None:
    d = run(empty())
    assert d.action is Action.ACQUIRE and set(d.writes) == set(STORES) and d.term == 1
    floored = run(empty(), floor=5000)
    assert floored.term == 5000


def test_rank_defers_a_new_lease_from_when_we_started_wanting_it() -> None:
    d = run(empty(since=NOW - 100), rank=2, step=0.25, want_since=NOW - 0.1)
    assert d.action is Action.WAIT and d.retry_at == NOW - 0.1 + 0.5


def test_a_lease_nobody_ever_claimed_goes_by_the_longer_new_step() -> None:
    """A new application: the better-ranked site may be seconds behind in a mass apply."""
    d = run(empty(since=NOW - 100), rank=1, step=0.25, new_step=1.0, want_since=NOW - 0.5)
    assert d.action is Action.WAIT and d.retry_at == NOW - 0.5 + 1.0
    released = {
        s: FamilyObs(s, True, 3, NOW - 100, (claim("site-a/n1", 3, state=ClaimState.RELEASED),))
        for s in STORES
    }
    d = run(released, rank=1, step=0.25, new_step=1.0, want_since=NOW - 0.5)
    assert d.action is Action.ACQUIRE, "a lease held before goes by the failover step"


def test_a_live_holder_is_never_preempted() -> None:
    d = run(held_by("site-a/n1"))
    assert d.action is Action.WAIT and d.retry_at == NOW - 0.5 + TTL
    # The wait for the holder's renewals is the holder's, watched once for all its leases.
    assert d.holders == {"site-a/n1"} and d.timer_at is None


def test_a_waits_own_timers_are_kept_apart_from_the_holders() -> None:
    fams = held_by("site-a/n1")
    fams["c"] = FamilyObs("c", False, 0, NOW, usable_at=NOW + 1.7)  # quarantined
    d = run(fams)
    assert d.action is Action.WAIT and d.retry_at == NOW - 0.5 + TTL
    assert d.timer_at == NOW + 1.7 and d.holders == {"site-a/n1"}


def test_a_holder_stale_in_a_quorum_is_expired_there_only() -> None:
    fams = held_by("site-a/n1", since=NOW - 3)
    fams["c"] = FamilyObs("c", False, 0, NOW)  # unreachable
    d = run(fams)
    assert d.action is Action.EXPIRE and d.target == "site-a/n1"
    assert d.writes == {"a": 5, "b": 5}


def test_a_holder_renewing_in_one_store_of_three_is_not_a_quorum_to_expire() -> None:
    """A bystander cut: the holder's own store is unreachable to us, it renews in one more
    store we see fresh: only one stale store is not enough to take anything."""
    fams = held_by("site-a/n1")
    fams["a"] = FamilyObs("a", False, 0, NOW)
    fams["c"] = held_by("site-a/n1", since=NOW - 5)["c"]
    assert run(fams).action is Action.WAIT


def test_an_expired_or_closed_or_reopened_session_frees_the_claim_in_that_store() -> None:
    base = held_by("site-a/n1")["a"]
    s = base.sessions["site-a/n1"]
    cases = {
        "expired": SessionObs(11, NOW, s.epoch, True, TTL, s.epoch, live_since=NOW - 5),
        "closed": SessionObs(11, NOW, s.epoch, False, TTL),
        "opened a new epoch": SessionObs(11, NOW, "another", True, TTL),
    }
    for why, sess in cases.items():
        fam = FamilyObs("a", True, 10, NOW, base.claims, {"site-a/n1": sess})
        v = classify(fam, ME, window=TTL)
        assert v.kind is Kind.FREE and why in v.why, (why, v)


def test_an_unreadable_session_counts_as_live_until_unchanged_for_a_ttl() -> None:
    fams = held_by("site-a/n1")
    for s in STORES:
        f = fams[s]
        fams[s] = FamilyObs(
            s, True, 10, f.since, f.claims, {"site-a/n1": SessionObs(5, NOW - 1, None, False, 0.0)}
        )
    assert run(fams).action is Action.WAIT  # not an instant takeover
    for s in STORES:
        f = fams[s]
        fams[s] = FamilyObs(
            s, True, 10, f.since, f.claims, {"site-a/n1": SessionObs(5, NOW - 3, None, False, 0.0)}
        )
    assert run(fams).action is Action.EXPIRE


def test_a_handover_is_ours_at_once_and_everyone_elses_after_the_window() -> None:
    fams = held_by("site-a/n1")
    for s in STORES:
        f = fams[s]
        c = ClaimObs("site-a/n1", 11, NOW - 0.1, ClaimRecord("x", 7, ClaimState.HANDOVER, "site-b"))
        fams[s] = FamilyObs(s, True, 11, f.since, (c,), f.sessions)
    d = run(fams, rank=2, step=1.0)
    assert d.action is Action.ACQUIRE and d.term == 8
    # Even just after we started wanting it: the holder chose us, rank does not matter.
    assert run(fams, rank=2, step=1.0, want_since=NOW).action is Action.ACQUIRE
    other = Me("site-c/n1", "site-c", {s: "ec" for s in STORES}, True, TTL)
    assert run(fams, me=other).action is Action.WAIT
    assert run(fams, me=other, now=NOW + TTL).action is Action.ACQUIRE


def test_our_own_handover_binds_us_too() -> None:
    """After handing over, the old holder must not take its own lease straight back."""
    fams = {}
    for s in STORES:
        c = ClaimObs(
            ME.agent, 11, NOW - 0.1, ClaimRecord(ME.epochs[s], 7, ClaimState.HANDOVER, "site-c")
        )
        fams[s] = FamilyObs(s, True, 11, NOW - 0.1, (c,), {})
    assert run(fams).action is Action.WAIT


def test_holding_survives_a_lagging_watch_and_repairs_a_store() -> None:
    mine = {
        s: FamilyObs(s, True, 10, NOW, (ClaimObs(ME.agent, 10, NOW, ClaimRecord(ME.epochs[s], 7)),))
        for s in STORES
    }
    lagging = dict(mine)
    lagging["a"] = FamilyObs("a", True, 3, NOW)  # our watch has not seen our claim yet
    d = run(lagging, held=Held(7, {"a": 10, "b": 10, "c": 10}))
    assert d.action is Action.HOLD and d.support == frozenset(STORES)
    reopened = dict(mine)  # our epoch in c changed: the claim there is dead, repair it
    reopened["c"] = FamilyObs(
        "c", True, 10, NOW, (ClaimObs(ME.agent, 10, NOW, ClaimRecord("old", 7)),)
    )
    d = run(reopened, held=Held(7, {"a": 10, "b": 10, "c": 10}))
    assert d.action is Action.HOLD and d.support == {"a", "b"} and d.writes == {"c": 10}


def test_a_lease_handed_back_is_held_while_a_watch_still_shows_our_earlier_tenure() -> None:
    """We held term 7 and handed it to site-a, which handed it back: we claimed term 9 in
    every store. Store c's watch still shows our term-7 handover and site-a's handover to
    us (our term-9 claim landed after both, by compare-and-set): not seen yet is not
    overwritten (seen: the lease dropped one millisecond after it was taken back)."""
    fams = {}
    for s in STORES:
        if s == "c":
            ours = ClaimObs(
                ME.agent, 5, NOW - 1, ClaimRecord(ME.epochs[s], 7, ClaimState.HANDOVER, "site-a")
            )
            theirs = ClaimObs(
                "site-a/n1", 8, NOW, ClaimRecord("ea-c", 8, ClaimState.HANDOVER, ME.agent)
            )
            fams[s] = FamilyObs(s, True, 8, NOW, (ours, theirs))
        else:
            mine = ClaimObs(ME.agent, 12, NOW, ClaimRecord(ME.epochs[s], 9))
            fams[s] = FamilyObs(s, True, 12, NOW, (mine,))
    d = run(fams, held=Held(9, {"a": 12, "b": 12, "c": 12}))
    assert d.action is Action.HOLD, d.why
    assert d.support == frozenset(STORES)


def test_holding_is_lost_when_our_epochs_end_below_a_quorum() -> None:
    old = {
        s: FamilyObs(s, True, 10, NOW, (ClaimObs(ME.agent, 10, NOW, ClaimRecord("gone", 7)),))
        for s in STORES
    }
    d = run(old, held=Held(7, {"a": 10, "b": 10, "c": 10}))
    assert d.action is Action.LOST and "only 0 stores" in d.why
    assert (
        run(empty(), held=Held(7, {"a": 1}), me=Me(ME.agent, ME.site, ME.epochs, False, TTL)).action
        is Action.LOST
    )


def test_our_acquisition_that_landed_unanswered_is_adopted_but_not_after_dropping_it() -> None:
    fams = {
        s: FamilyObs(s, True, 10, NOW, (ClaimObs(ME.agent, 10, NOW, ClaimRecord(ME.epochs[s], 9)),))
        for s in STORES
    }
    d = run(fams)
    assert d.action is Action.HOLD and d.term == 9
    again = run(fams, dropped=9)  # we lost it meanwhile: win it anew, with a new term
    assert again.action is Action.ACQUIRE and again.term == 10


def test_the_term_is_above_every_claim_seen_in_a_family() -> None:
    old = ClaimObs("site-c/n1", 4, NOW - 10, ClaimRecord("x", 41, ClaimState.RELEASED))
    newer = ClaimObs("site-a/n1", 5, NOW - 10, ClaimRecord("y", 12, ClaimState.RELEASED))
    fams = {s: FamilyObs(s, True, 5, NOW - 10, (old, newer)) for s in STORES}
    assert run(fams).term == 42


def test_a_claim_written_out_of_turn_neither_ends_a_holding_nor_frees_the_lease() -> None:
    """A compromised agent writes its own claim key without the compare-and-set, newest in
    every family: the real holder keeps holding and honest contenders see it held."""
    real = held_by("site-a/n1")
    for s in STORES:
        f = real[s]
        rogue = ClaimObs("site-e/n1", 20, NOW - 0.1, ClaimRecord("whatever", 99))
        real[s] = FamilyObs(s, True, 20, NOW - 0.1, (*f.claims, rogue), f.sessions)
    d = run(real)
    assert d.action is Action.WAIT and "site-a/n1 in 3" in d.why
    holder = Me("site-a/n1", "site-a", {s: f"ea-{s}" for s in STORES}, True, TTL)
    d = run(real, me=holder, held=Held(7, {s: 10 for s in STORES}))
    assert d.action is Action.HOLD and d.support == frozenset(STORES)


def test_a_forged_expiry_frees_nothing_before_a_ttl_without_renewals() -> None:
    """An expiry written without watching the session stale (no compare-and-set) ends the
    holder's epoch, but the holder may still believe until its last renewal + ttl: the
    lease is free only then."""
    fams = held_by("site-a/n1")
    for s in STORES:
        f = fams[s]
        sess = f.sessions["site-a/n1"]
        forged = SessionObs(12, NOW, sess.epoch, True, TTL, sess.epoch, live_since=NOW - 0.3)
        fams[s] = FamilyObs(s, True, 10, f.since, f.claims, {"site-a/n1": forged})
    d = run(fams)
    assert d.action is Action.WAIT and d.retry_at == NOW - 0.3 + TTL
    assert run(fams, now=NOW - 0.3 + TTL).action is Action.ACQUIRE
