"""The counting rules of ``agent.app_metrics`` on plain values (the live agents of
``test_metrics.py`` cover the wiring): restarts seen through the Interpret's count and
through a crash followed by a start, verbs from hostile subjects, deleted applications, and
moves counted by the receiver whatever order its runner and its lease manager see them in."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from agent import app_metrics
from agent.app_metrics import TALLIES, HolderLog
from agent.metrics import render
from scores.base import Observation, WorkloadState

RUNNING = WorkloadState.RUNNING
FAILED = WorkloadState.FAILED


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    TALLIES.apps.clear()
    TALLIES.commands.clear()
    TALLIES.seen.clear()
    yield
    TALLIES.apps.clear()
    TALLIES.commands.clear()
    TALLIES.seen.clear()


def feed(app: str, *observations: Observation | None) -> int:
    for obs in observations:
        app_metrics.observed(app, obs)
    return TALLIES.app(app).restarts


def test_restarts_by_the_interpret_count_their_delta() -> None:
    assert feed("a", Observation(RUNNING), Observation(RUNNING, restarts=1)) == 1
    assert feed("a", Observation(FAILED, reason="crashed", restarts=1)) == 1
    assert feed("a", Observation(RUNNING, restarts=3)) == 3  # two more between two cycles


def test_a_crash_then_a_start_is_one_restart_even_without_the_count() -> None:
    """``restart: never``: the Interpret does not restart; the controller starts it again
    (a new run, whose count starts at 0 again)."""
    crashed = Observation(FAILED, reason="crashed", restarts=2)
    assert feed("b", Observation(RUNNING, restarts=2), crashed, Observation(RUNNING)) == 1


def test_stops_deadlines_and_new_runs_are_not_restarts() -> None:
    assert (
        feed(
            "c",
            Observation(RUNNING, restarts=4),
            Observation(WorkloadState.STOPPED, reason="stopped", restarts=4),
            Observation(RUNNING),  # a new run: its count starts again at 0
            Observation(FAILED, reason="deadline"),
            Observation(RUNNING),
            None,
        )
        == 0
    )


def test_commands_by_verb_and_result_with_unknown_verbs_folded() -> None:
    app_metrics.command("harmony.cmd.site-a.n1.fence", ok=True)
    app_metrics.command("harmony.cmd.app.ledger.failover", ok=False)
    app_metrics.command("harmony.cmd.site-a.n1." + "x" * 300, ok=False)
    app_metrics.command("harmony.cmd.site-a.n1.FENCE", ok=False)
    assert TALLIES.commands == {
        ("fence", "ok"): 1,
        ("failover", "error"): 1,
        ("other", "error"): 2,
    }


def test_prune_forgets_deleted_applications() -> None:
    app_metrics.gave_up("gone")
    app_metrics.gave_up("kept")
    app_metrics.observed("gone", Observation(RUNNING))
    TALLIES.prune(["kept"])
    assert set(TALLIES.apps) == {"kept"} and not TALLIES.seen
    assert TALLIES.app("kept").give_ups == 1


def test_render_writes_what_the_client_library_writes() -> None:
    """``agent.metrics.render`` (the fast path of /metrics) is byte for byte the library's
    ``generate_latest`` on every kind of family, with label values needing escapes."""
    registry = CollectorRegistry(auto_describe=False)
    counter = Counter("harmony_t_events", "Doc with \\ and\nnewline", ["app"], registry=registry)
    counter.labels('quote " back \\ nl \n é').inc(3)
    counter.labels("plain").inc()
    Gauge("harmony_t_level", "A gauge", registry=registry).set(1796132411575)
    Histogram("harmony_t_seconds", "A histogram", registry=registry).observe(0.3)
    Info("harmony_t", "An info", registry=registry).info({"version": "1.0"})
    Gauge("harmony_t_nan", "Not a number", registry=registry).set(float("nan"))
    assert render(registry) == generate_latest(registry)


class Leases:
    """The read side of a lease manager that ``HolderLog`` uses: the holder of each lease
    and, per store, the claims of a lease family (agent, state, to)."""

    def __init__(self) -> None:
        self.agent, self.site = "site-b/n1", "site-b"
        self.holder: str | None = None
        self.claims: list[Any] = []
        self.caches = {
            "site-a": SimpleNamespace(family=lambda _: SimpleNamespace(claims=self.claims))
        }

    def holder_of(self, name: str) -> str | None:
        return self.holder

    def claim(self, agent: str, state: str, to: str | None = None) -> None:
        record = SimpleNamespace(state=SimpleNamespace(value=state), to=to)
        self.claims[:] = [SimpleNamespace(agent=agent, record=record)]


def moves(leases: Leases) -> tuple[int, int]:
    counts = TALLIES.app("ledger")
    return counts.handovers, counts.failovers


@pytest.mark.parametrize("runner_first", [True, False], ids=["runner-first", "callback-first"])
def test_a_handover_is_counted_once_whichever_sees_the_new_holder_first(runner_first: bool) -> None:
    """CI saw the runner's cycle read our own new claim as the holder before the lease
    manager's ``on_acquired`` callback ran; the move was then not counted at all."""
    leases = Leases()
    log = HolderLog(cast(Any, leases))
    leases.holder = "site-a/n1"
    assert log.holder_of("ledger") == "site-a/n1"
    leases.claim("site-a/n1", "handover", to="site-b")
    leases.holder = leases.agent
    if runner_first:
        log.holder_of("ledger")
    log.acquired("ledger", 2, 0.0)
    log.holder_of("ledger")
    assert moves(leases) == (1, 0)
    log.acquired("ledger", 2, 0.0)  # our own claim again (a repair): no second count
    assert moves(leases) == (1, 0)


def test_a_takeover_is_a_failover_and_a_first_start_is_neither() -> None:
    leases = Leases()
    log = HolderLog(cast(Any, leases))
    leases.holder = leases.agent
    log.holder_of("ledger")
    log.acquired("ledger", 1, 0.0)  # first start
    assert moves(leases) == (0, 0)
    leases.holder = "site-a/n1"
    log.holder_of("ledger")
    leases.claim("site-a/n1", "held")  # its holder died; the claim stays
    leases.holder = leases.agent
    log.holder_of("ledger")
    log.acquired("ledger", 3, 0.0)
    assert moves(leases) == (0, 1)
