"""The ``Process`` Score: a supervised local process, fenced by a guard process.

The Interpret restarts a crashed workload with exponential backoff; the guard
(``scores/guard.py``) enforces what must hold even when this event loop does not run:
the lease deadline and "never outlive the agent".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from scores.base import Interpret, Observation, Outcome, RunContext, Score, WorkloadState
from scores.duration import Duration
from topologies.capabilities import ProcessRuntime
from topologies.higher_order import Provides, resolve

GUARD = Path(__file__).with_name("guard.py")
_INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")
"""Only these of the agent's variables reach a workload: the agent's own (NATS credentials,
HARMONY_AGENT_* overrides) are none of its business."""


class ProcessSpec(Score):
    """A command run on the agent's machine, restarted when it crashes."""

    kind: Literal["Process"] = "Process"
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: Path | None = None
    stop_timeout: Duration = 5.0
    restart: Literal["always", "on-failure", "never"] = "always"
    backoff_initial: Duration = 1.0
    backoff_max: Duration = 30.0
    backoff_reset: Duration = 60.0
    """A run lasting this long counts as healthy: the next crash backs off from the start."""
    log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    log_backups: int = Field(default=3, ge=0)

    required_capabilities: ClassVar[frozenset[type]] = frozenset({ProcessRuntime})

    def interpret(self, topology: Provides[ProcessRuntime]) -> ProcessInterpret:
        return ProcessInterpret(self, resolve(topology))


class _Guarded:
    """One guard process and the workload it started."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid: int | None = None
        self.started_at = time.monotonic()
        self.exit: dict[str, Any] | None = None

    def send(self, line: str) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                stdin.write(line.encode() + b"\n")

    async def next_event(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                event: dict[str, Any] = json.loads(line)
                return event
        return None


class ProcessInterpret(Interpret):
    enforces_deadline: ClassVar[bool] = True

    def __init__(self, spec: ProcessSpec, runtime: ProcessRuntime) -> None:
        self.spec = spec
        self._runtime = runtime
        self._guarded: _Guarded | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._deadline: float | None = None
        self._restarts = 0
        self._state = WorkloadState.STOPPED
        self._detail = "not started"
        self._reason: str | None = None
        self.log_path: Path | None = None

    # deadline
    def extend_deadline(self, monotonic_deadline: float) -> None:
        self._deadline = monotonic_deadline
        if self._guarded is not None:
            self._guarded.send(f"deadline {monotonic_deadline!r}")

    def clear_deadline(self) -> None:
        self._deadline = None
        if self._guarded is not None:
            self._guarded.send("clear")

    # apply / stop / observe
    async def apply(self, ctx: RunContext) -> Outcome:
        if ctx.deadline is not None:
            self.extend_deadline(ctx.deadline)
        if self._task is not None and not self._task.done():
            return Outcome.done(f"{ctx.app} already running", changed=False)
        if self._deadline is not None and self._deadline <= time.monotonic():
            return Outcome.failed(f"{ctx.app}: lease deadline already passed, not starting")
        self._stopping = asyncio.Event()
        self._restarts = 0
        first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(ctx, first), name=f"process:{ctx.app}")
        outcome: Outcome = await first
        return outcome

    async def stop(self) -> Outcome:
        task = self._task
        if task is None or task.done():
            return Outcome.done("already stopped", changed=False)
        self._stopping.set()
        if self._guarded is not None:
            self._guarded.send("stop")
        try:
            await asyncio.wait_for(asyncio.shield(task), self.spec.stop_timeout + 5.0)
        except TimeoutError:
            self._kill_hard()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)
        return Outcome.done(self._detail)

    async def observe(self) -> Observation:
        guarded = self._guarded
        pids: tuple[int, ...] = ()
        extra: dict[str, Any] = {"log": str(self.log_path) if self.log_path else None}
        if guarded is not None and guarded.pid is not None and self._state is WorkloadState.RUNNING:
            pids = _group_members(guarded.pid)
            extra["guard_pid"] = guarded.proc.pid
        return Observation(self._state, self._detail, pids, self._reason, self._restarts, extra)

    async def close(self) -> None:
        await self.stop()

    # supervision
    async def _supervise(self, ctx: RunContext, first: asyncio.Future[Outcome]) -> None:
        backoff = self.spec.backoff_initial
        try:
            while not self._stopping.is_set():
                started = await self._run_once(ctx, first)
                if not started or self._stopping.is_set() or self._reason in {"deadline"}:
                    break
                guarded = self._guarded
                code = guarded.exit.get("returncode") if guarded and guarded.exit else None
                if self.spec.restart == "never" or (
                    self.spec.restart == "on-failure" and code == 0
                ):
                    break
                ran = time.monotonic() - guarded.started_at if guarded else 0.0
                if ran > self.spec.backoff_reset:
                    backoff = self.spec.backoff_initial
                self._detail += f"; restarting in {backoff:g}s"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, self.spec.backoff_max)
                if not self._stopping.is_set():
                    self._restarts += 1
            if self._stopping.is_set() and self._reason == "crashed":
                self._set(WorkloadState.STOPPED, "stopped while waiting to restart", "stopped")
        finally:
            if not first.done():
                first.set_result(Outcome.failed(self._detail))
            self._guarded = None

    async def _run_once(self, ctx: RunContext, first: asyncio.Future[Outcome]) -> bool:
        if self._deadline is not None and self._deadline <= time.monotonic():
            self._set(WorkloadState.FAILED, "lease deadline passed: not restarting", "deadline")
            return False
        try:
            guarded = _Guarded(await self._spawn_guard(ctx))
        except OSError as exc:
            self._set(WorkloadState.FAILED, f"cannot start the guard: {exc}", "spawn-failed")
            return False
        self._guarded = guarded
        event = await guarded.next_event()
        if event is None or event.get("event") != "started":
            error = event.get("error") if event else "guard exited without a word"
            self._set(WorkloadState.FAILED, f"cannot start: {error}", "spawn-failed")
            await guarded.proc.wait()
            return False
        guarded.pid = int(event["pid"])
        self._set(WorkloadState.RUNNING, f"running as pid {guarded.pid}", None)
        if not first.done():
            first.set_result(Outcome.done(f"{ctx.app} started as pid {guarded.pid}"))
        while (event := await guarded.next_event()) is not None:
            if event.get("event") == "exited":
                guarded.exit = event
        await guarded.proc.wait()
        self._record_exit(guarded)
        return True

    def _record_exit(self, guarded: _Guarded) -> None:
        exit_ = guarded.exit or {"returncode": None, "reason": "guard-died"}
        code, reason = exit_.get("returncode"), str(exit_.get("reason"))
        how = (
            f"killed by {_signame(-code)}" if isinstance(code, int) and code < 0 else f"exit {code}"
        )
        if reason == "deadline":
            self._set(WorkloadState.FAILED, f"killed at the lease deadline ({how})", "deadline")
        elif reason in {"stopped", "agent-gone"} or self._stopping.is_set():
            self._set(WorkloadState.STOPPED, f"stopped ({how})", "stopped")
        elif code == 0:
            self._set(WorkloadState.STOPPED, f"exited on its own ({how})", "exited")
        else:
            self._set(WorkloadState.FAILED, f"crashed ({how})", "crashed")

    async def _spawn_guard(self, ctx: RunContext) -> asyncio.subprocess.Process:
        spec = self.spec
        self.log_path = ctx.workload_dir / f"{ctx.app}.log"
        argv = [sys.executable, "-I", str(GUARD), "--parent", str(os.getpid())]
        argv += ["--log", str(self.log_path), "--stop-timeout", repr(spec.stop_timeout)]
        argv += ["--max-bytes", str(spec.log_max_bytes), "--backups", str(spec.log_backups)]
        if self._deadline is not None:
            argv += ["--deadline", repr(self._deadline)]
        if spec.cwd is not None:
            argv += ["--cwd", str(spec.cwd)]
        env = {k: v for k, v in os.environ.items() if k in _INHERITED_ENV}
        env.update(spec.env)
        env.update(ctx.harmony_env())
        return await self._runtime.spawn(
            [*argv, "--", *spec.command],
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            new_session=True,  # a SIGSTOP/SIGINT aimed at the agent's group spares the guard
        )

    def _kill_hard(self) -> None:
        """The guard did not answer in time: do its job from here."""
        guarded = self._guarded
        if guarded is None:
            return
        for pid, kill in ((guarded.pid, os.killpg), (guarded.proc.pid, os.kill)):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)

    def _set(self, state: WorkloadState, detail: str, reason: str | None) -> None:
        self._state, self._detail, self._reason = state, detail, reason


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _group_members(pgid: int) -> tuple[int, ...]:
    """Every live pid in the workload's process group (Linux /proc), leader first."""
    members = [pgid]
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == pgid:
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(entry.path, "stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    members.append(int(entry.name))
    return tuple(members)
