"""The ``health:`` block of an Application, its rules with the lease ttl, and the tracker.

Everything here is pure (no I/O, no event loop): the probe runners that feed the tracker are
in ``scores/probes.py``. The model lives in ``scores`` (not ``agent``) for the same reason
``Duration`` does: the probe runners need it, and ``scores`` may not import ``agent``.

Semantics follow Docker's HEALTHCHECK, whose field names these are: failures during
``start_period`` do not count, but the first success ends the start period early; after
``failure_threshold`` consecutive failures the holder gives the application up, and stays
out for ``cooldown`` unless its probe passes again first.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from scores.base import Observation, WorkloadState
from scores.duration import Duration, format_duration

PROBE_KINDS = ("exec", "http", "tcp")

BUILTIN_FAILURE_REASONS = frozenset({"failed", "not-progressing", "not-ready-timeout"})
"""``Observation.reason`` tokens that count as a failed health check (built-in health):
a systemd unit in ``failed``, a Kubernetes workload not progressing or not ready past its
deadline. A Process crash is not here: the controller counts crashes itself (restarts)."""

FENCE_LEAD = 0.25
"""Seconds before the lease deadline at which a transient systemd fence timer fires: the
timer's AccuracySec (100 ms) plus the time ``systemctl`` needs to kill the unit."""

RENEWALS_PER_TTL = 3
"""The session is renewed every ttl/3 (docs/leases.md)."""


def deadline_clock() -> float:
    """The clock lease deadlines are expressed on (SPEC v2): CLOCK_BOOTTIME seconds."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); ValueError with a one-line message."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # raises ValueError with its own message
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:5432, not {value!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return host, port


class ProbeSpec(_Strict):
    """Exactly one of ``exec: [cmd, args...]``, ``http: URL`` or ``tcp: HOST:PORT``."""

    exec: list[str] | None = None
    http: str | None = None
    tcp: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        example = "{exec: [cmd, args...]}, {http: URL} or {tcp: HOST:PORT}"
        if not isinstance(data, dict):
            raise ValueError(f"expected one of {example}")
        unknown = sorted(str(k) for k in data if k not in PROBE_KINDS)
        if unknown:
            raise ValueError(f"unknown probe kind {unknown[0]!r} (expected exec, http or tcp)")
        given = [k for k in PROBE_KINDS if data.get(k) is not None]
        if len(given) != 1:
            found = " and ".join(given) if given else "none"
            raise ValueError(f"give exactly one probe kind of exec, http or tcp (got {found})")
        return data

    @field_validator("exec")
    @classmethod
    def _argv(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value or not value[0].strip():
                raise ValueError("needs a program to run: [cmd, args...]")
            if any("\0" in arg for arg in value):
                raise ValueError("arguments must not contain NUL characters")
        return value

    @field_validator("http")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https"):
                raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
            if not parts.hostname:
                raise ValueError(f"URL {value!r} has no host")
            try:
                parts.port  # noqa: B018 - raises ValueError for a bad port
            except ValueError as exc:
                raise ValueError(f"URL {value!r}: {exc}") from None
        return value

    @field_validator("tcp")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @property
    def kind(self) -> str:
        return "exec" if self.exec is not None else "http" if self.http is not None else "tcp"

    @property
    def target(self) -> str:
        """What is probed, for messages: the command line, URL or address."""
        if self.exec is not None:
            return " ".join(self.exec)
        return self.http if self.http is not None else str(self.tcp)


class HealthSpec(_Strict):
    """``spec.health``: how the holder decides that its instance is unhealthy."""

    probe: ProbeSpec | None = None
    """Optional: without one, only the Score's built-in health counts."""
    period: Duration = 1.0
    timeout: Duration = 1.0
    failure_threshold: int = Field(default=3, ge=1)
    start_period: Duration = 10.0
    cooldown: Duration | None = None
    """How long a site that gave up stays out unless its probe passes again first;
    None means the agent's default (max(10 s, 5 x lease ttl))."""

    @field_validator("period", "timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_within_period(cls, value: float, info: ValidationInfo) -> float:
        period = info.data.get("period")
        if period is not None and value > period:
            raise ValueError(
                f"{format_duration(value)} must not exceed period "
                f"({format_duration(period)}): probes would overlap"
            )
        return value

    @property
    def detection_time(self) -> float:
        """Worst case from the first failing check to giving up (start period excluded)."""
        return self.period * self.failure_threshold + self.timeout


DEFAULT_HEALTH = HealthSpec()
"""Built-in health only, with the documented defaults: for Applications without ``health:``."""


def health_rules(
    health: HealthSpec | None,
    ttl: float,
    *,
    margin: float | None = None,
    score_kind: str | None = None,
) -> list[str]:
    """The rules between ``health``, the Score and the lease ttl that are violated; [] if none.

    Like Patroni's ``loop_wait + 2*retry_timeout <= ttl``, each line names the rule. ``margin``
    defaults to the agent's (ttl/10, at least 50 ms); ``score_kind`` adds the rules of that
    Score's fencing (``SystemdUnit``).
    """
    health = health or DEFAULT_HEALTH
    margin = margin if margin is not None else max(0.05, ttl / 10)
    d = format_duration
    broken: list[str] = []
    if health.cooldown is not None and health.cooldown < ttl:
        broken.append(
            f"rule 'cooldown >= lease.ttl' violated: cooldown {d(health.cooldown)} < ttl "
            f"{d(ttl)} (the site that gave up could win the lease straight back before "
            "another site sees it free)"
        )
    judge = health.start_period + health.period * health.failure_threshold
    if health.cooldown is not None and health.cooldown < judge:
        broken.append(
            f"rule 'cooldown >= start_period + period x failure_threshold' violated: cooldown "
            f"{d(health.cooldown)} < {d(judge)} (the next site would not get a full start "
            "period and detection window before this one contends again)"
        )
    if score_kind == "SystemdUnit":
        slack = ttl - margin - ttl / RENEWALS_PER_TTL
        if slack <= FENCE_LEAD:
            broken.append(
                f"rule 'ttl - margin - ttl/3 > fence lead {d(FENCE_LEAD)}' violated: "
                f"{d(round(slack, 3))} with ttl {d(ttl)} and margin {d(margin)} (the "
                "SystemdUnit fence timer would stop the unit between two healthy renewals)"
            )
    return broken


# --- the tracker -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One health check: a probe's answer, or the Score's built-in health."""

    ok: bool
    detail: str
    source: str
    """What was checked, for the sentence: ``probe exec``, ``built-in health``..."""


class Phase(enum.StrEnum):
    IDLE = "idle"
    """Nothing runs here and we did not give up: nothing to check."""
    STARTING = "starting"
    """Within start_period after a start: failures do not count yet."""
    WATCHING = "watching"
    COOLING = "cooling"
    """Gave up: out until the cooldown ends or the probe passes again."""


@dataclass(frozen=True, slots=True)
class Verdict:
    phase: Phase
    failures: int
    threshold: int
    last: CheckResult | None
    why: str
    """The sentence without the application's name, e.g. ``probe exec failed 3 times...``."""
    app: str = ""

    @property
    def sentence(self) -> str:
        """What to log: ``ledger: probe exec failed 3 times in a row (threshold 3): ...``."""
        return f"{self.app}: {self.why}" if self.app else self.why

    @property
    def crossed(self) -> bool:
        """The threshold is reached: the holder should give the application up."""
        return self.failures >= self.threshold


class HealthTracker:
    """Consecutive failures of one application's health checks, on an injected clock.

    Pure: it never reads the time itself, so tests drive it with a fake clock.
    """

    def __init__(
        self, app: str, health: HealthSpec | None = None, *, clock: Callable[[], float]
    ) -> None:
        self.app = app
        self.health = health or DEFAULT_HEALTH
        self._clock = clock
        self._phase = Phase.IDLE
        self._grace_until = float("-inf")
        self._cool_until = float("-inf")
        self._failures = 0
        self._last: CheckResult | None = None
        self._recovered = False

    # lifecycle
    def started(self) -> None:
        """The workload (re)started here: a fresh start period, no failures."""
        self._phase = Phase.STARTING
        self._grace_until = self._clock() + self.health.start_period
        self._failures = 0
        self._last = None
        self._recovered = False

    def stopped(self) -> None:
        """The workload no longer runs here (an ongoing cooldown continues)."""
        if self._phase is not Phase.COOLING:
            self._phase = Phase.IDLE
            self._failures = 0

    def gave_up(self, default_cooldown: float) -> float:
        """The holder gives the application up now; returns the cooldown in seconds."""
        cooldown = self.health.cooldown if self.health.cooldown is not None else default_cooldown
        self._phase = Phase.COOLING
        self._cool_until = self._clock() + cooldown
        self._failures = 0
        self._recovered = False
        return cooldown

    # results
    def record(self, result: CheckResult) -> Verdict:
        now = self._clock()
        self._last = result
        phase = self._phase
        if phase is Phase.COOLING:
            if now >= self._cool_until:
                self._phase = Phase.IDLE
            elif result.ok:
                self._phase = Phase.IDLE
                self._recovered = True
        elif phase is Phase.STARTING:
            if result.ok or now >= self._grace_until:
                self._phase = Phase.WATCHING  # the first success ends the start period
            if self._phase is Phase.WATCHING and not result.ok:
                self._failures += 1
        elif phase is Phase.WATCHING:
            self._failures = 0 if result.ok else self._failures + 1
        return self.verdict()

    @property
    def phase(self) -> Phase:
        if self._phase is Phase.COOLING and self._clock() >= self._cool_until:
            self._phase = Phase.IDLE
        if self._phase is Phase.STARTING and self._clock() >= self._grace_until:
            self._phase = Phase.WATCHING
        return self._phase

    @property
    def cooling(self) -> bool:
        """Still out after giving up: the cooldown runs and no probe has passed since."""
        return self.phase is Phase.COOLING

    def take_recovery(self) -> bool:
        """True once after a probe passed during the cooldown (the site may contend again)."""
        recovered, self._recovered = self._recovered, False
        return recovered

    def verdict(self) -> Verdict:
        phase = self.phase
        threshold = self.health.failure_threshold
        why = self._why(phase)
        return Verdict(phase, self._failures, threshold, self._last, why, self.app)

    def _why(self, phase: Phase) -> str:
        last, n, threshold = self._last, self._failures, self.health.failure_threshold
        if phase is Phase.COOLING:
            left = max(0.0, self._cool_until - self._clock())
            tail = f": {last.source}: {last.detail}" if last is not None and not last.ok else ""
            return f"gave up, out for {left:.1f}s unless the probe passes{tail}"
        if last is None:
            return f"health not checked yet ({phase.value})"
        if last.ok:
            return f"{last.source} passed"
        if phase is Phase.STARTING:
            return f"{last.source} failed within start_period: {last.detail}"
        times = "time" if n == 1 else "times"
        return f"{last.source} failed {n} {times} in a row (threshold {threshold}): {last.detail}"


def builtin_failure(obs: Observation | None) -> str | None:
    """The detail of an Observation that counts as a failed health check, else None."""
    if (
        obs is not None
        and obs.state is WorkloadState.FAILED
        and obs.reason in BUILTIN_FAILURE_REASONS
    ):
        return obs.detail or str(obs.reason)
    return None
