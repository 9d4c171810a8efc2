"""The ``health:`` block: one-line errors naming the field, the ttl rules, the tracker."""

from __future__ import annotations

import pytest

from agent.application import ApplicationError, parse_documents
from scores.base import Observation, WorkloadState
from scores.health import (
    CheckResult,
    HealthSpec,
    HealthTracker,
    Phase,
    builtin_failure,
    health_rules,
)

APP = """
apiVersion: harmony/v1
kind: Application
metadata: {name: ledger}
spec:
  trait: stateful
  placement: {sites: [site-a]}
  score: {kind: Process, command: [sleep, "60"]}
"""


def _health(block: str, score: str | None = None) -> HealthSpec | None:
    text = APP + f"  health: {block}\n"
    if score is not None:
        text = text.replace('{kind: Process, command: [sleep, "60"]}', score)
    (app,) = parse_documents(text)
    return app.spec.health


@pytest.mark.parametrize(
    ("block", "field", "needle"),
    [
        ("{probe: {grpc: [x]}}", "spec.health.probe", "unknown probe kind 'grpc'"),
        ("{probe: {}}", "spec.health.probe", "exactly one probe kind"),
        ("{probe: {exec: [a], tcp: 'h:1'}}", "spec.health.probe", "got exec and tcp"),
        ("{probe: {exec: []}}", "spec.health.probe.exec", "needs a program"),
        ("{probe: {http: 'ftp://h/'}}", "spec.health.probe.http", "http:// or https://"),
        ("{probe: {tcp: '127.0.0.1'}}", "spec.health.probe.tcp", "expected HOST:PORT"),
        ("{probe: {tcp: 'h:70000'}}", "spec.health.probe.tcp", "out of range"),
        ("{period: 0}", "spec.health.period", "greater than 0"),
        ("{period: 0s, timeout: 0s}", "spec.health.period", "greater than 0"),
        ("{failure_threshold: 0}", "spec.health.failure_threshold", "greater than or equal to 1"),
        ("{period: 1s, timeout: 2s}", "spec.health.timeout", "must not exceed period (1s)"),
        ("{start_period: soon}", "spec.health.start_period", "invalid duration"),
        ("{cooldown: -1}", "spec.health.cooldown", "must not be negative"),
        ("{probes: {}}", "spec.health.probes", "unknown field"),
    ],
)
def test_bad_health_is_one_line_naming_the_field(block: str, field: str, needle: str) -> None:
    with pytest.raises(ApplicationError) as err:
        _health(block)
    message = str(err.value)
    assert "\n" not in message
    assert f"(ledger): {field}: " in message, message
    assert needle in message, message


def test_probe_on_kubernetes_manifests_is_refused() -> None:
    score = (
        "{kind: KubernetesManifests, manifests: [{apiVersion: v1, kind: X, metadata: {name: x}}]}"
    )
    with pytest.raises(ApplicationError, match=r"spec\.health: probe: .*readinessProbe"):
        _health("{probe: {tcp: '127.0.0.1:1'}}", score)
    assert _health("{failure_threshold: 2}", score) is not None  # built-in health only is fine


def test_good_health_parses_with_defaults_and_round_trips() -> None:
    health = _health("{probe: {http: 'http://127.0.0.1:8080/healthz'}, cooldown: 1m}")
    assert health is not None and health.probe is not None
    assert (health.probe.kind, health.probe.target) == ("http", "http://127.0.0.1:8080/healthz")
    assert (health.period, health.timeout, health.failure_threshold) == (1.0, 1.0, 3)
    assert (health.start_period, health.cooldown) == (10.0, 60.0)
    (app,) = parse_documents(APP + "  health: {probe: {tcp: '[::1]:5432'}}\n")
    assert type(app).from_json(app.to_json()) == app


def test_health_rules_name_each_violated_rule() -> None:
    fine = HealthSpec(cooldown=60)
    assert health_rules(fine, 10.0) == []
    assert health_rules(None, 10.0, score_kind="SystemdUnit") == []

    short = HealthSpec(cooldown=5, start_period=0, period=1, failure_threshold=3)
    (rule,) = health_rules(short, 10.0)
    assert rule.startswith("rule 'cooldown >= lease.ttl' violated: cooldown 5s < ttl 10s")

    window = HealthSpec(cooldown=12, start_period=10, period=1, failure_threshold=3)
    (rule,) = health_rules(window, 10.0)
    assert "rule 'cooldown >= start_period + period x failure_threshold' violated" in rule
    assert "12s < 13s" in rule

    (fence,) = health_rules(None, 0.4, score_kind="SystemdUnit")
    assert fence.startswith("rule 'ttl - margin - ttl/3 > fence lead 250ms' violated")
    assert health_rules(None, 0.4, score_kind="Process") == []
    assert len(health_rules(HealthSpec(cooldown=0.1), 0.4, score_kind="SystemdUnit")) == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


FAIL = CheckResult(False, "exit 1: connection refused", "probe exec")
PASS = CheckResult(True, "exit 0", "probe exec")


def test_tracker_counts_consecutive_failures_after_the_start_period() -> None:
    clock = FakeClock()
    health = HealthSpec(start_period=10, failure_threshold=3)
    tracker = HealthTracker("ledger", health, clock=clock)
    assert tracker.verdict().phase is Phase.IDLE
    assert not tracker.record(FAIL).crossed, "nothing runs: nothing counts"

    tracker.started()
    for _ in range(5):
        verdict = tracker.record(FAIL)
        clock.now += 1
    assert (verdict.phase, verdict.failures) == (Phase.STARTING, 0)
    assert "failed within start_period" in verdict.sentence

    clock.now += 5  # start period over
    assert tracker.record(FAIL).failures == 1
    assert tracker.record(FAIL).failures == 2
    assert not tracker.record(PASS).failures, "a success resets the count"
    tracker.record(FAIL)
    tracker.record(FAIL)
    verdict = tracker.record(FAIL)
    assert verdict.crossed and verdict.phase is Phase.WATCHING
    assert verdict.sentence == (
        "ledger: probe exec failed 3 times in a row (threshold 3): exit 1: connection refused"
    )


def test_first_success_ends_the_start_period() -> None:
    clock = FakeClock()
    tracker = HealthTracker("ledger", HealthSpec(start_period=60), clock=clock)
    tracker.started()
    assert tracker.record(FAIL).failures == 0
    assert tracker.record(PASS).phase is Phase.WATCHING
    assert tracker.record(FAIL).failures == 1, "counted although 60s have not passed"
    tracker.started()  # a restart opens a fresh start period
    assert tracker.verdict().phase is Phase.STARTING and tracker.verdict().failures == 0


def test_cooldown_ends_when_the_probe_passes_or_time_is_up() -> None:
    clock = FakeClock()
    tracker = HealthTracker("ledger", HealthSpec(start_period=0, cooldown=30), clock=clock)
    tracker.started()
    for _ in range(3):
        tracker.record(FAIL)
    assert tracker.verdict().crossed
    assert tracker.gave_up(default_cooldown=99) == 30
    assert tracker.cooling and not tracker.verdict().crossed
    tracker.record(FAIL)
    clock.now += 10
    assert tracker.cooling and "out for 20.0s unless the probe passes" in tracker.verdict().sentence
    assert not tracker.take_recovery()
    tracker.record(PASS)
    assert not tracker.cooling and tracker.take_recovery() and not tracker.take_recovery()

    tracker.started()
    for _ in range(3):
        tracker.record(FAIL)
    tracker.gave_up(default_cooldown=99)
    clock.now += 30
    assert not tracker.cooling and not tracker.take_recovery(), "timed out, not recovered"


def test_default_cooldown_is_the_agents() -> None:
    tracker = HealthTracker("ledger", None, clock=FakeClock())
    assert tracker.gave_up(default_cooldown=50.0) == 50.0


def test_builtin_failures() -> None:
    failed_unit = Observation(
        WorkloadState.FAILED, "ledger.service: failed/failed", reason="failed"
    )
    assert builtin_failure(failed_unit) == "ledger.service: failed/failed"
    stuck = Observation(WorkloadState.FAILED, "Deployment/web: stuck", reason="not-progressing")
    assert builtin_failure(stuck) == "Deployment/web: stuck"
    crashed = Observation(WorkloadState.FAILED, "crashed (exit 1)", reason="crashed")
    assert builtin_failure(crashed) is None, "Process crashes are counted by the controller"
    assert builtin_failure(Observation(WorkloadState.RUNNING, "ok")) is None
    assert builtin_failure(None) is None
