"""The agent's side of the fence (``topologies/fence.py``): start, stop and fence workloads.

One ``FenceSupervisor`` per agent. Launches and deadline changes go to the fence over its
stdin; the session deadline goes over a second pipe written directly by the session thread
(``session_deadline`` is thread-safe and never blocks), so deadlines keep moving while the
agent's main loop is busy, and stop moving the moment renewals stop.

If the fence itself dies, its workloads die with it (PR_SET_PDEATHSIG) and are reported as
exited with reason ``fence-died``; the supervisor then starts a new fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("topologies.fence")

FENCE = Path(__file__).with_name("fence.py")

Support = tuple[tuple[str, str], ...]


def group_name(support: Support) -> str:
    """The fence's name for the deadline of one claim support (store=epoch pairs)."""
    return ",".join(f"{store}={epoch}" for store, epoch in support)


class LaunchError(RuntimeError):
    """The fence could not start the workload; the message is one line."""


@dataclass(frozen=True, slots=True)
class Launch:
    """One workload start: everything the fence needs, nothing of the agent's own."""

    id: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log: Path
    cwd: Path | None = None
    uid: int | None = None
    gid: int | None = None
    stop_timeout: float = 5.0
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 3
    mode: str = "none"
    """``follow`` the session deadline, a ``fixed`` one, or ``none`` (SplitBrainAllowed)."""
    deadline: float | None = None
    support: Support = ()
    """With ``follow``: follow this claim's validity instead of the anchored session's."""


@dataclass(frozen=True, slots=True)
class Exit:
    pid: int
    code: int | None
    reason: str
    """``exited``, ``deadline``, ``stopped``, ``agent-gone`` or ``fence-died``."""


def _future() -> asyncio.Future[Exit]:
    return asyncio.get_running_loop().create_future()


@dataclass
class _Running:
    pid: int
    exited: asyncio.Future[Exit] = field(default_factory=_future)


class FenceSupervisor:
    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._running: dict[str, _Running] = {}
        self._pending: dict[str, asyncio.Future[_Running]] = {}
        self._session_r, self._session_w = os.pipe()
        os.set_blocking(self._session_w, False)
        self._lock = threading.Lock()
        self._last_session = float("-inf")
        self._last_groups: Mapping[str, float] = {}
        self._uses: dict[str, Support] = {}
        """Workload id -> the claim support its fence deadline follows (main loop only)."""
        self._groups: Mapping[str, Support] = {}
        """Every support in use, replaced whole (read by the session thread)."""
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closing = False
        self.started = asyncio.Event()
        """Set once the fence answered (again, after a restart)."""

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self.proc = await asyncio.create_subprocess_exec(
            self.python,
            "-I",
            str(FENCE),
            "--parent",
            str(os.getpid()),
            "--session-fd",
            str(self._session_r),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            pass_fds=(self._session_r,),
            start_new_session=True,  # a signal to the agent's process group spares it
        )
        self._reader = asyncio.create_task(self._read(self.proc), name="fence-reader")
        await asyncio.wait_for(asyncio.shield(self._ready), 10.0)
        self.session_deadline(self._last_session, self._last_groups)
        self.started.set()
        log.info("fence_started", msg=f"fence started (pid {self.proc.pid})", pid=self.proc.pid)

    async def run(self) -> None:
        """Supervise the fence for ever (a named task of the agent): restart it if it dies."""
        while True:
            proc = self.proc
            if proc is None:
                await self.start()
                continue
            code = await proc.wait()
            if self._closing:
                return
            self.restarts += 1
            log.error(
                "fence_exited",
                msg=f"fence exited ({code}); its workloads died with it; restarting it",
                code=code,
            )
            self.started.clear()
            self._fail_all("fence-died")
            self.proc = None
            await asyncio.sleep(min(0.2 * self.restarts, 2.0))

    async def close(self, timeout: float = 30.0) -> None:
        """Workloads should be stopped already; the fence terminates any leftover."""
        self._closing = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    # --- deadlines -------------------------------------------------------------------------

    def session_deadline(self, deadline: float, groups: Mapping[str, float] | None = None) -> None:
        """The anchored session deadline, and the deadline of each claim support in
        ``groups()`` (any thread; never blocks; a dropped update only makes the fence
        stricter)."""
        self._last_session = deadline
        self._last_groups = groups or {}
        line = f"{deadline!r}\n".encode()
        if groups:
            line += json.dumps({"groups": dict(groups)}).encode() + b"\n"
        with self._lock, contextlib.suppress(BlockingIOError, OSError):
            os.write(self._session_w, line)

    def groups(self) -> Mapping[str, Support]:
        """The claim supports some workload follows, by group name (any thread)."""
        return self._groups

    def set_deadline(
        self, wid: str, mode: str, deadline: float | None = None, support: Support = ()
    ) -> None:
        group = self._use(wid, mode, support)
        self._send(
            {"op": "deadline", "id": wid, "mode": mode, "deadline": deadline, "group": group}
        )

    def _use(self, wid: str, mode: str, support: Support) -> str | None:
        """Record which support ``wid`` follows (None: the anchored session, or no follow).
        The set the session thread reads is rebuilt only when it changes: most workloads
        follow the anchored session, and a start storm must not pay O(n) per spawn."""
        follows = support if mode == "follow" and support else None
        if self._uses.get(wid) != follows:
            if follows is None:
                del self._uses[wid]
            else:
                self._uses[wid] = follows
            self._groups = {group_name(s): s for s in set(self._uses.values())}
        return group_name(follows) if follows is not None else None

    # --- workloads -------------------------------------------------------------------------

    async def spawn(self, launch: Launch) -> tuple[int, asyncio.Future[Exit]]:
        """Start a workload; returns its pid and a future resolved when it exits."""
        if self.proc is None or self.proc.returncode is not None:
            raise LaunchError("the fence is not running")
        if launch.id in self._running or launch.id in self._pending:
            raise LaunchError(f"{launch.id} is already running")
        started: asyncio.Future[_Running] = asyncio.get_running_loop().create_future()
        self._pending[launch.id] = started
        self._send(
            {
                "op": "spawn",
                "id": launch.id,
                "argv": list(launch.argv),
                "env": dict(launch.env),
                "cwd": str(launch.cwd) if launch.cwd else None,
                "uid": launch.uid,
                "gid": launch.gid,
                "log": str(launch.log),
                "max_bytes": launch.max_bytes,
                "backups": launch.backups,
                "stop_timeout": launch.stop_timeout,
                "mode": launch.mode,
                "deadline": launch.deadline,
                "group": self._use(launch.id, launch.mode, launch.support),
            }
        )
        try:
            running = await asyncio.wait_for(started, 30.0)
        except TimeoutError:
            raise LaunchError(f"{launch.id}: the fence did not answer") from None
        finally:
            self._pending.pop(launch.id, None)
        return running.pid, running.exited  # it may have exited already: the future says

    def stop(self, wid: str) -> None:
        """SIGTERM its process group; the fence SIGKILLs it after its stop_timeout."""
        self._send({"op": "stop", "id": wid})

    def kill(self, wid: str) -> None:
        self._send({"op": "kill", "id": wid})

    def running(self, wid: str) -> int | None:
        r = self._running.get(wid)
        return r.pid if r is not None else None

    # --- plumbing --------------------------------------------------------------------------

    def _send(self, body: dict[str, Any]) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        with contextlib.suppress(OSError, RuntimeError):
            proc.stdin.write(json.dumps(body).encode() + b"\n")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                event = json.loads(line)
                self._on_event(event)
            except (ValueError, KeyError, TypeError) as exc:
                log.error(
                    "fence_bad_line", msg=f"bad line from the fence: {exc!r}", error=repr(exc)
                )

    def _on_event(self, event: dict[str, Any]) -> None:
        ev, wid = event["ev"], str(event["id"])
        if ev == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        if ev == "started":
            running = _Running(int(event["pid"]))
            self._running[wid] = running
            fut = self._pending.get(wid)
            if fut is not None and not fut.done():
                fut.set_result(running)
        elif ev == "spawn-failed":
            self._use(wid, "none", ())
            fut = self._pending.get(wid)
            if fut is not None and not fut.done():
                fut.set_exception(LaunchError(str(event.get("error", "cannot start"))))
        elif ev == "exited":
            self._use(wid, "none", ())
            ended = self._running.pop(wid, None)
            if ended is not None and not ended.exited.done():
                code = event.get("code")
                ended.exited.set_result(
                    Exit(ended.pid, code if isinstance(code, int) else None, str(event["reason"]))
                )

    def _fail_all(self, reason: str) -> None:
        for running in self._running.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(running.pid, signal.SIGKILL)  # grandchildren the fence left behind
            if not running.exited.done():
                running.exited.set_result(Exit(running.pid, None, reason))
        self._running.clear()
        self._uses.clear()
        self._groups = {}
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(LaunchError("the fence died"))
