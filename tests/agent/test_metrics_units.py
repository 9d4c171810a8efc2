"""The counting rules of ``agent.app_metrics`` on plain values (the live agents of
``test_metrics.py`` cover the wiring): restarts seen through the Interpret's count and
through a crash followed by a start, verbs from hostile subjects, deleted applications."""

from __future__ import annotations

from collections.abc import Iterator

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
from agent.app_metrics import TALLIES
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
