"""The ``SystemdUnit`` Score: a service unit rendered from typed fields.

The unit has no ``[Install]`` section on purpose: the agent, holding the lease, decides when
it runs; a unit enabled at boot would start without one.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from scores.base import Interpret, Observation, Outcome, RunContext, Score, WorkloadState
from scores.duration import Duration, format_duration
from topologies.capabilities import SystemdManager
from topologies.higher_order import Provides, resolve
from topologies.systemd import check_unit_name

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHOW = "LoadState,ActiveState,SubState,MainPID,Result,ExecMainStatus"


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


class SystemdUnitInterpret(Interpret):
    def __init__(self, spec: SystemdUnitSpec, systemd: SystemdManager) -> None:
        self.spec = spec
        self._systemd = systemd

    async def apply(self, ctx: RunContext) -> Outcome:
        name = self.spec.unit
        try:
            content = self.spec.render(ctx)
            changed = await self._systemd.read_unit(name) != content
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

    async def stop(self) -> Outcome:
        name = self.spec.unit
        try:
            before = await self.observe()
            if before.state is not WorkloadState.RUNNING:
                return Outcome.done(f"{name} not running", changed=False)
            result = await self._systemd.systemctl("stop", name)
        except OSError as exc:
            return Outcome.failed(f"{name}: {exc}")
        return Outcome.done(f"{name} stopped") if result.ok else Outcome.failed(result.summary())

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
        return observation_from_show(name, props)


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
