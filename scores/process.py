"""The ``Process`` Score: a local process started and fenced by the agent's fence process.

The Interpret restarts a crashed workload with exponential backoff. What must hold even when
the agent's event loop does not run (the lease deadline, "never outlive the agent") is the
fence's job (``topologies/fence.py``). Observing costs nothing: exits arrive as events from
the fence, nothing scans /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from scores.base import (
    Deadline,
    Interpret,
    Observation,
    Outcome,
    RunContext,
    Score,
    WorkloadState,
)
from scores.duration import Duration
from topologies.capabilities import ProcessRuntime
from topologies.higher_order import Provides, resolve
from topologies.supervisor import Exit, Launch, LaunchError

_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
"""Only these of the agent's variables reach a workload: the agent's own (NATS credentials,
HARMONY_AGENT_* overrides, LD_PRELOAD...) are none of its business."""


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


def _how(code: int | None) -> str:
    if code is None:
        return "killed"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


class ProcessInterpret(Interpret):
    enforces_deadline: ClassVar[bool] = True
    reports_changes: ClassVar[bool] = True
    follows_session_itself: ClassVar[bool] = True

    def __init__(self, spec: ProcessSpec, runtime: ProcessRuntime) -> None:
        self.spec = spec
        self._runtime = runtime
        self._id = ""
        self._deadline: Deadline | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._pid: int | None = None
        self._restarts = 0
        self._state = WorkloadState.STOPPED
        self._detail = "not started"
        self._reason: str | None = None
        self.log_path: Path | None = None
        self._watchers: list[Callable[[], None]] = []

    # --- deadline ---------------------------------------------------------------------------

    def _mode(self) -> tuple[str, float | None, tuple[tuple[str, str], ...]]:
        """How the fence bounds the workload: ``follow`` the anchored session, ``follow``
        the lease's own support (claimed in fewer stores than the session is anchored in),
        or a ``fixed`` instant (no support known)."""
        d = self._deadline
        if d is None:
            return "none", None, ()
        if d.follows_session:
            return "follow", d.at, ()
        if d.support:
            return "follow", d.at, d.support
        return "fixed", d.at, ()

    def set_deadline(self, deadline: Deadline | None) -> None:
        before = self._mode()
        self._deadline = deadline
        mode, at, support = self._mode()
        if (mode, support, at if mode == "fixed" else None) == (
            before[0],
            before[2],
            before[1] if before[0] == "fixed" else None,
        ):
            return  # following: the fence has the moving deadline already
        if self._pid is not None:
            self._runtime.set_deadline(self._id, mode, at, support)

    # --- apply / stop / observe ---------------------------------------------------------------

    async def apply(self, ctx: RunContext) -> Outcome:
        self.set_deadline(ctx.deadline)
        if self._task is not None and not self._task.done():
            return Outcome.done(f"{ctx.app} already running", changed=False)
        self._id = ctx.app
        self._stopping = asyncio.Event()
        self._restarts = 0
        first: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(ctx, first), name=f"process:{ctx.app}")
        return await first

    async def stop(self) -> Outcome:
        task = self._task
        if task is None or task.done():
            return Outcome.done("already stopped", changed=False)
        self._stopping.set()
        if self._pid is not None:
            self._runtime.stop_workload(self._id)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.spec.stop_timeout + 5.0)
        except TimeoutError:
            self._runtime.kill_workload(self._id)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5.0)
        return Outcome.done(self._detail)

    async def observe(self) -> Observation:
        pids = (self._pid,) if self._pid is not None else ()
        extra = {"log": str(self.log_path) if self.log_path else None}
        return Observation(self._state, self._detail, pids, self._reason, self._restarts, extra)

    async def close(self) -> None:
        await self.stop()

    # --- supervision -----------------------------------------------------------------------

    def _launch(self, ctx: RunContext) -> Launch:
        spec = self.spec
        self.log_path = ctx.workload_dir / f"{ctx.app}.log"
        env = {k: v for k, v in os.environ.items() if k in _INHERITED_ENV}
        env.update(spec.env)
        env.update(ctx.harmony_env())
        uid, gid = self._runtime.run_as
        mode, at, support = self._mode()
        return Launch(
            id=ctx.app,
            argv=spec.command,
            env=env,
            log=self.log_path,
            cwd=spec.cwd,
            uid=uid,
            gid=gid,
            stop_timeout=spec.stop_timeout,
            max_bytes=spec.log_max_bytes,
            backups=spec.log_backups,
            mode=mode,
            deadline=at,
            support=support,
        )

    async def _supervise(self, ctx: RunContext, first: asyncio.Future[Outcome]) -> None:
        backoff = self.spec.backoff_initial
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping.is_set():
                try:
                    pid, exited = await self._runtime.launch(self._launch(ctx))
                except LaunchError as exc:
                    self._set(WorkloadState.FAILED, f"cannot start: {exc}", "spawn-failed")
                    break
                started = loop.time()
                self._pid = pid
                self._set(WorkloadState.RUNNING, f"running as pid {pid}", None)
                if not first.done():
                    first.set_result(Outcome.done(f"{ctx.app} started as pid {pid}"))
                end = await exited
                self._pid = None
                self._record_exit(end)
                if self._stopping.is_set() or end.reason in ("deadline", "agent-gone"):
                    break
                if end.reason != "fence-died" and (
                    self.spec.restart == "never"
                    or (self.spec.restart == "on-failure" and end.code == 0)
                ):
                    break
                if loop.time() - started > self.spec.backoff_reset:
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
            self._pid = None
            if not first.done():
                first.set_result(Outcome.failed(self._detail))

    def _record_exit(self, end: Exit) -> None:
        how = _how(end.code)
        if end.reason == "deadline":
            self._set(WorkloadState.FAILED, f"killed at the lease deadline ({how})", "deadline")
        elif end.reason == "fence-died":
            self._set(WorkloadState.FAILED, "the fence process died", "crashed")
        elif end.reason in {"stopped", "agent-gone"} or self._stopping.is_set():
            self._set(WorkloadState.STOPPED, f"stopped ({how})", "stopped")
        elif end.code == 0:
            self._set(WorkloadState.STOPPED, f"exited on its own ({how})", "exited")
        else:
            self._set(WorkloadState.FAILED, f"crashed ({how})", "crashed")

    def watch(self, cb: Callable[[], None]) -> None:
        self._watchers.append(cb)

    def _set(self, state: WorkloadState, detail: str, reason: str | None) -> None:
        self._state, self._detail, self._reason = state, detail, reason
        for cb in list(self._watchers):
            cb()
