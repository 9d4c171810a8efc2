"""The observation cache wakes leases only for what can change a decision (issue 17)."""

from __future__ import annotations

from mesh.observe import StoreCache
from mesh.records import ClaimRecord, ExpiryRecord, SessionRecord, SessionState

KEY = "sess.site-a.n1.live"
AGENT = "site-a/n1"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def session(epoch: str, state: SessionState = SessionState.ALIVE, seq: int = 1) -> bytes:
    return SessionRecord(epoch, state, 2.0, seq).encode()


def test_a_plain_renewal_moves_since_and_wakes_nobody() -> None:
    clock = Clock()
    cache = StoreCache("a", clock)
    assert cache.apply(KEY, 1, session("e1")) == (None, AGENT), "a new session wakes"
    clock.t = 101.0
    assert cache.apply(KEY, 2, session("e1", seq=2)) == (None, None)
    obs = cache.session(AGENT)
    assert obs is not None and obs.seq == 2 and obs.since == 101.0 and obs.live_since == 101.0


def test_a_new_epoch_a_close_or_an_expiry_wakes_the_agents_leases() -> None:
    cache = StoreCache("a", Clock())
    cache.apply(KEY, 1, session("e1"))
    cache.apply("lease.ledger.site-a.n1", 2, ClaimRecord("e1", 7).encode())
    assert cache.claimed_by[AGENT] == {"lease.ledger.>"}
    assert cache.apply(KEY, 3, session("e2")) == (None, AGENT)
    assert cache.apply(KEY, 4, session("e2", SessionState.CLOSED)) == (None, AGENT)
    assert cache.apply(KEY, 5, session("e3")) == (None, AGENT)
    expiry = "sess.site-a.n1.expired.site-b.n1"
    assert cache.apply(expiry, 6, ExpiryRecord("e3").encode()) == (None, AGENT)
    obs = cache.session(AGENT)
    assert obs is not None and obs.expired_epoch == "e3"
    assert cache.apply(KEY, 7, session("e3", seq=9)) == (None, AGENT), "a write after an expiry"
    assert cache.apply(KEY, 8, None) == (None, AGENT), "a deleted record"
