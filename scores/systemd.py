"""The ``SystemdUnit`` Score: a service unit rendered from typed fields, fenced by systemd.

The unit has no ``[Install]`` section on purpose: the agent, holding the lease, decides when
it runs; a unit enabled at boot would start without one.

**The fence.** Under a lease deadline the unit is started only once a transient systemd timer
is armed that stops it (``systemctl stop --no-block`` then ``systemctl kill
--signal=SIGKILL``) at the deadline, and every renewal pushes the timer forward. So a hung,
paused or killed agent cannot leave the unit running past its lease: systemd enforces it.

A timer's ``OnActiveSec`` cannot be changed once it exists (systemd accepts timer properties
only while creating a transient unit; ``systemctl set-property`` answers "Cannot set property
TimersMonotonic"). So each renewal creates a new timer in the other of two slots, then stops
the old one, in one ``sh -c`` on the host: at every instant at least one timer is armed, and
none fires later than the current deadline. Measured on systemd 252: 27 ms per renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from scores.base import (
    Deadline,
    Interpret,
    Observation,
    Outcome,
    RunContext,
    Score,
    WorkloadState,
)
from scores.duration import Duration, format_duration
from scores.health import FENCE_LEAD, deadline_clock
from topologies.capabilities import SystemdManager
from topologies.higher_order import Provides, resolve
from topologies.systemd import check_unit_name

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHOW = "LoadState,ActiveState,SubState,MainPID,Result,ExecMainStatus"

FENCE_ACCURACY = "100ms"
FENCE_SCRIPT = 'systemctl stop --no-block "$1"; exec systemctl kill --signal=SIGKILL "$1"'
"""What the fence timer runs: a queued stop job keeps Restart= from restarting the unit
(systemd ignores Restart= while a stop job is pending), the SIGKILL makes it immediate."""

MIN_ALLOWANCE, MAX_ALLOWANCE = 0.05, 2.0
"""Bounds of the arming round trip (seconds) subtracted from the timer's delay."""

ARM_SCRIPT = (
    'new=$1 old=$2; shift 2; systemctl stop "$new.timer" >/dev/null 2>&1; '
    '"$@" || exit $?; systemctl stop "$old.timer" >/dev/null 2>&1; exit 0'
)
"""Arm one slot: clear a leftover in it, create the timer (``$@`` is the systemd-run argv),
and only then stop the other slot's timer."""


class SystemdUnitSpec(Score):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["SystemdUnit"] = "SystemdUnit"
    unit: str
    """Unit name, e.g. ``ledger.service``; fixed so that stop and observe find it later."""
    description: str = "Managed by harmony-agent"
    exec_start: list[str] = Field(min_length=1)
    environment: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    group: str | None = None
    working_directory: str | None = None
    service_type: Literal["simple", "exec", "notify", "forking", "oneshot"] = Field(
        default="exec", alias="type"
    )
    restart: Literal["no", "on-failure", "on-abnormal", "always"] = "on-failure"
    restart_sec: Duration = 1.0
    stop_timeout: Duration = 5.0
    after: list[str] = Field(default_factory=lambda: ["network-online.target"])
    wants: list[str] = Field(default_factory=lambda: ["network-online.target"])

    required_capabilities: ClassVar[frozenset[type]] = frozenset({SystemdManager})

    @field_validator("unit")
    @classmethod
    def _unit_name(cls, value: str) -> str:
        if not value.endswith(".service"):
            raise ValueError("unit must end in .service")
        return check_unit_name(value)

    @field_validator("environment")
    @classmethod
    def _env_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_KEY.match(key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return value

    @field_validator("description", "exec_start", "environment", "user", "working_directory")
    @classmethod
    def _one_line(cls, value: str | list[str] | dict[str, str] | None) -> object:
        texts: list[str] = []
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, dict):
            texts = list(value.values())
        elif value is not None:
            texts = list(value)
        if any(ord(ch) < 32 for text in texts for ch in text):
            raise ValueError("control characters (newlines) are not allowed in unit files")
        return value

    def interpret(self, topology: Provides[SystemdManager]) -> SystemdUnitInterpret:
        return SystemdUnitInterpret(self, resolve(topology))

    def render(self, ctx: RunContext) -> str:
        """The unit file; HARMONY_* variables make it change with every lease holder."""
        env = {**self.environment, **ctx.harmony_env()}
        lines = [
            "# Written by harmony-agent; local changes are overwritten.",
            "[Unit]",
            f"Description={_specifiers(self.description)}",
            *(f"After={name}" for name in self.after),
            *(f"Wants={name}" for name in self.wants),
            "",
            "[Service]",
            f"Type={self.service_type}",
            "ExecStart=" + " ".join(quote_exec_arg(arg) for arg in self.exec_start),
            *(f"Environment={_quote(f'{k}={v}', dollar=False)}" for k, v in sorted(env.items())),
        ]
        if self.user:
            lines.append(f"User={self.user}")
        if self.group:
            lines.append(f"Group={self.group}")
        if self.working_directory:
            lines.append(f"WorkingDirectory={_specifiers(self.working_directory)}")
        lines += [
            f"Restart={self.restart}",
            f"RestartSec={format_duration(self.restart_sec)}",
            f"TimeoutStopSec={format_duration(self.stop_timeout)}",
            "KillMode=control-group",
            "",
        ]
        return "\n".join(lines)


def _specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _quote(text: str, *, dollar: bool) -> str:
    escaped = _specifiers(text).replace("\\", "\\\\").replace('"', '\\"')
    if dollar:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def quote_exec_arg(arg: str) -> str:
    """One ExecStart word, quoted so systemd neither splits it nor expands $ or %."""
    if arg and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", arg):
        return _specifiers(arg)
    return _quote(arg, dollar=True)


def fence_slots(unit: str) -> tuple[str, str]:
    """The two transient timer names (without ``.timer``) that fence ``unit``."""
    stem = unit.removesuffix(".service")
    return f"harmony-fence-{stem}-a", f"harmony-fence-{stem}-b"


def fence_run_argv(slot: str, unit: str, delay_ms: int) -> list[str]:
    """The exact ``systemd-run`` call creating one fence timer and its service."""
    return [
        "systemd-run",
        "--quiet",
        "--collect",
        f"--unit={slot}",
        f"--description=harmony-agent lease fence for {unit}",
        f"--on-active={delay_ms}ms",
        f"--timer-property=AccuracySec={FENCE_ACCURACY}",
        "--timer-property=RemainAfterElapse=no",
        "--",
        "/bin/sh",
        "-c",
        FENCE_SCRIPT,
        "sh",
        unit,
    ]


def fence_unit_files(slot: str, unit: str, delay_ms: int) -> dict[str, str]:
    """Unit files equivalent to ``fence_run_argv`` (for ``systemd-analyze verify``)."""
    description = f"Description=harmony-agent lease fence for {unit}"
    command = " ".join(quote_exec_arg(a) for a in ["/bin/sh", "-c", FENCE_SCRIPT, "sh", unit])
    return {
        f"{slot}.timer": "\n".join(
            [
                "[Unit]",
                description,
                "",
                "[Timer]",
                f"OnActiveSec={delay_ms}ms",
                f"AccuracySec={FENCE_ACCURACY}",
                "RemainAfterElapse=no",
                "",
            ]
        ),
        f"{slot}.service": "\n".join(
            [
                "[Unit]",
                description,
                "CollectMode=inactive-or-failed",
                "",
                "[Service]",
                f"ExecStart={command}",
                "",
            ]
        ),
    }


class SystemdUnitInterpret(Interpret):
    """Apply/stop/observe a unit; under a lease deadline, fenced by a transient timer."""

    enforces_deadline: ClassVar[bool] = True
    deadline_note: ClassVar[str] = "deadline enforced outside the agent (transient systemd timer)"

    def __init__(self, spec: SystemdUnitSpec, systemd: SystemdManager) -> None:
        self.spec = spec
        self._systemd = systemd
        self._slots = fence_slots(spec.unit)
        self._deadline: float | None = None
        """The latest lease deadline given (CLOCK_BOOTTIME), or None."""
        self._fencing = False
        """The unit was started under a deadline: renewals must move the timer."""
        self._armed: float | None = None
        """The deadline the armed timer enforces; None when no timer is armed."""
        self._rearm = False
        """The armed timer may fire late (a slow round trip): arm again even if it fits."""
        self._slot = 1
        self._allowance = MIN_ALLOWANCE
        """Seconds subtracted for the arming command's round trip (1.5 x the last one)."""
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.fence_error: str | None = None
        self.arms = 0
        self._swept = False

    # --- deadline --------------------------------------------------------------------------

    def set_deadline(self, deadline: Deadline | None) -> None:
        """Move the fence to ``deadline.at`` (CLOCK_BOOTTIME), or disarm it (None); cheap:
        the timer is re-armed in the background, the old one stays armed until then. The
        agent calls this on every renewal; a hung agent does not, and the timer fires."""
        if deadline is None:
            self._deadline = None
            if self._fencing or self._armed is not None:
                self._fencing = False
                self._kick()
            return
        self._deadline = deadline.at
        if self._fencing:
            self._kick()

    def _kick(self) -> None:
        self._wake.set()
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to do yet
            if self._keeper is None or self._keeper.done():
                self._keeper = asyncio.get_running_loop().create_task(
                    self._keep(), name=f"fence:{self.spec.unit}"
                )

    async def _keep(self) -> None:
        while self._wake.is_set():
            self._wake.clear()
            if self._fencing and self._deadline is not None:
                await self._arm(self._deadline)
            elif not self._fencing and self._armed is not None:
                await self._disarm()

    async def _arm(self, deadline: float) -> str | None:
        """Arm the fence for ``deadline``; None when armed, else why not."""
        async with self._lock:
            if self._armed is not None and deadline <= self._armed and not self._rearm:
                return None  # deadlines only move forward; the armed timer already fits
            new = 1 - self._slot
            began = deadline_clock()
            delay = deadline - began - FENCE_LEAD - self._allowance
            delay_ms = max(1, int(delay * 1000))
            argv = fence_run_argv(self._slots[new], self.spec.unit, delay_ms)
            try:
                result = await self._systemd.sh(
                    ARM_SCRIPT, self._slots[new], self._slots[1 - new], *argv
                )
            except OSError as exc:
                self.fence_error = f"cannot arm the fence timer: {exc}"
                return self.fence_error
            took = deadline_clock() - began
            if not result.ok:
                self.fence_error = f"cannot arm the fence timer: {result.summary()}"
                return self.fence_error
            self._slot, self._armed, self.fence_error = new, deadline, None
            self.arms += 1
            used, self._allowance = (
                self._allowance,
                min(max(took * 1.5, MIN_ALLOWANCE), MAX_ALLOWANCE),
            )
            # The timer fires at most ``took`` after the computed instant; when that is more
            # than was subtracted (a slow or fresh connection), arm again at once with the
            # measured round trip subtracted.
            self._rearm = took > used and used < MAX_ALLOWANCE
            if self._rearm:
                self._kick()
            elif took > used:
                self.fence_error = (
                    f"arming took {took:.2f}s: the fence may fire up to "
                    f"{took - used:.2f}s after the deadline"
                )
            return None

    async def _disarm(self) -> None:
        async with self._lock:
            try:
                result = await self._systemd.systemctl("stop", *(f"{s}.timer" for s in self._slots))
            except OSError as exc:
                self.fence_error = f"cannot disarm the fence timer: {exc}"
                return
            if result.returncode in (124, 255):  # not reached: leave it armed (fail safe)
                self.fence_error = f"cannot disarm the fence timer: {result.summary()}"
                return
            self._armed = None  # 5: a slot was not loaded, the other one is stopped

    def fence_fired(self) -> bool:
        """The armed timer's instant has passed: systemd has stopped (or is stopping) the unit."""
        return (
            self._armed is not None
            and deadline_clock() >= self._armed - FENCE_LEAD - self._allowance
        )

    # --- apply / stop / observe -----------------------------------------------------------

    async def apply(self, ctx: RunContext) -> Outcome:
        name = self.spec.unit
        self._deadline = ctx.deadline.at if ctx.deadline is not None else None
        try:
            content = self.spec.render(ctx)
            changed = await self._systemd.read_unit(name) != content
            if self._deadline is None and not self._swept:
                # A previous incarnation's timers would stop this unfenced run: clear them.
                await self._disarm()
                self._swept = True
            if self._deadline is not None:  # armed before anything can start the unit
                if self._deadline - deadline_clock() <= FENCE_LEAD:
                    return Outcome.failed(f"{name}: lease deadline already passed, not starting")
                problem = await self._arm(self._deadline)
                if problem is not None:
                    return Outcome.failed(f"{name}: {problem}; not starting an unfenced unit")
                self._fencing = True
            if changed:
                await self._systemd.install_unit(name, content)
                reload = await self._systemd.systemctl("daemon-reload")
                if not reload.ok:
                    return Outcome.failed(reload.summary())
            elif (await self.observe()).state is WorkloadState.RUNNING:
                return Outcome.done(f"{name} already running", changed=False)
            verb = "restart" if changed else "start"
            result = await self._systemd.systemctl(verb, name)
        except (OSError, ValueError) as exc:
            return Outcome.failed(f"{name}: {exc}")
        if not result.ok:
            return Outcome.failed(result.summary())
        return Outcome.done(f"{name} {verb}ed" + (" with a new unit file" if changed else ""))

    async def fence_settled(self) -> None:
        """Wait until no re-arming is in progress (tests; the agent never needs to wait)."""
        while self._keeper is not None and not self._keeper.done():
            await asyncio.shield(self._keeper)

    async def stop(self) -> Outcome:
        name = self.spec.unit
        try:
            before = await self.observe()
            if before.state is not WorkloadState.RUNNING:
                outcome = Outcome.done(f"{name} not running", changed=False)
            else:
                result = await self._systemd.systemctl("stop", name)
                if not result.ok:
                    return Outcome.failed(result.summary())  # the fence stays armed
                outcome = Outcome.done(f"{name} stopped")
        except OSError as exc:
            return Outcome.failed(f"{name}: {exc}")
        self._fencing = False
        if self._armed is not None:
            await self._disarm()
        return outcome

    async def uninstall(self) -> Outcome:
        """Stop, then remove the unit file: for an Application deleted from the mesh."""
        stopped = await self.stop()
        if not stopped.ok:
            return stopped
        try:
            await self._systemd.remove_unit(self.spec.unit)
            await self._systemd.systemctl("daemon-reload")
        except OSError as exc:
            return Outcome.failed(f"{self.spec.unit}: {exc}")
        return Outcome.done(f"{self.spec.unit} removed")

    async def observe(self) -> Observation:
        name = self.spec.unit
        try:
            result = await self._systemd.systemctl("show", name, f"--property={_SHOW}")
        except OSError as exc:
            return Observation(WorkloadState.FAILED, f"{name}: {exc}", reason="unreachable")
        if not result.ok:
            return Observation(WorkloadState.FAILED, result.summary(), reason="unreachable")
        props = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        seen = observation_from_show(name, props)
        fence = self._fence_status()
        if seen.state is not WorkloadState.RUNNING and self._fencing and self.fence_fired():
            detail = f"{name}: stopped at the lease deadline by the fence timer"
            return Observation(WorkloadState.FAILED, detail, reason="deadline", extra=fence)
        return Observation(
            seen.state, seen.detail, seen.pids, seen.reason, extra={**seen.extra, **fence}
        )

    def _fence_status(self) -> dict[str, Any]:
        armed = self._armed
        left = None if armed is None else round(armed - deadline_clock(), 3)
        return {"fence": {"armed_for": left, "error": self.fence_error, "arms": self.arms}}

    async def close(self) -> None:
        """Stop re-arming; an armed timer stays (it still guards the running unit)."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper


def observation_from_show(name: str, props: dict[str, str]) -> Observation:
    """Map ``systemctl show`` properties onto running / stopped / failed."""
    active, sub = props.get("ActiveState", "unknown"), props.get("SubState", "")
    detail = f"{name}: {active}/{sub}, result {props.get('Result', '?')}"
    pid = int(props.get("MainPID", "0") or 0)
    pids = (pid,) if pid > 0 else ()
    if props.get("LoadState") == "not-found":
        return Observation(WorkloadState.STOPPED, f"{name}: not installed", reason="not-found")
    if active in {"active", "activating", "reloading"}:
        return Observation(WorkloadState.RUNNING, detail, pids, extra=props)
    if active == "failed":
        return Observation(WorkloadState.FAILED, detail, pids, reason="failed", extra=props)
    return Observation(WorkloadState.STOPPED, detail, pids, reason=active, extra=props)
