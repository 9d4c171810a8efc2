"""Restart safety: what this agent's previous incarnation may have left running.

Workloads die with their agent, but not at once: the fence gives each its ``stop_timeout``
after SIGTERM. An agent restarted within that window must not start a second copy beside
the dying first one. So ``<state_dir>/controller/instances.json`` (0600) records the fence's
pid and every workload's process group (with kernel start times, so a recycled pid is never
mistaken for ours), and a starting agent stops whatever of it still runs, and waits until it
is gone, before it contends for any lease.

The fence pid is written at once; workloads are written in the background, coalesced
(1,000 starts must not cost 1,000 fsyncs). A workload the file missed still belongs to the
old fence, which terminates it before exiting: waiting for the old fence covers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("agent.controller")

FILE_MODE = 0o600


@dataclass(frozen=True)
class Recorded:
    app: str
    token: int
    pid: int
    """Workload process (its process group leader)."""
    pid_start: int | None
    stop_timeout: float = 5.0


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int | None, start: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    now = proc_start_time(pid)
    return now is not None and (start is None or now == start)


class StateFile:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "controller" / "instances.json"
        self.fence: tuple[int, int | None] | None = None
        self.entries: dict[str, Recorded] = {}
        self._dirty = asyncio.Event()

    def load(self) -> tuple[tuple[int, int | None] | None, dict[str, Recorded]]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return None, {}
        out: dict[str, Recorded] = {}
        fence = None
        if isinstance(raw, dict):
            f = raw.get("fence")
            if isinstance(f, list) and len(f) == 2 and isinstance(f[0], int):
                fence = (f[0], f[1] if isinstance(f[1], int) else None)
            apps = raw.get("apps")
            for app, entry in (apps if isinstance(apps, dict) else {}).items():
                with contextlib.suppress(TypeError, ValueError):
                    out[app] = Recorded(**entry)
        return fence, out

    def save(self) -> None:
        """Write the file now (0600 from the first byte, replaced atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        body = {
            "fence": list(self.fence) if self.fence else None,
            "apps": {k: asdict(v) for k, v in self.entries.items()},
        }
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def set_fence(self, pid: int) -> None:
        self.fence = (pid, proc_start_time(pid))
        self.save()

    def record(self, app: str, token: int, pid: int | None, stop_timeout: float) -> None:
        if pid is None:
            return
        old = self.entries.get(app)
        if old is not None and (old.pid, old.token) == (pid, token):
            return
        self.entries[app] = Recorded(app, token, pid, proc_start_time(pid), stop_timeout)
        self._dirty.set()

    def forget(self, app: str) -> None:
        if self.entries.pop(app, None) is not None:
            self._dirty.set()

    async def run(self, every: float = 0.5) -> None:
        """Flush changes in the background, at most every ``every`` seconds."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await asyncio.to_thread(self.save)
            except OSError as exc:
                log.error(
                    "statefile_write_failed",
                    msg=f"cannot write the state file {self.path}: {exc!r}",
                    path=str(self.path),
                    error=repr(exc),
                )
            await asyncio.sleep(every)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_leftovers(state: StateFile, *, poll: float = 0.02) -> list[str]:
    """Stop the previous incarnation's fence and workloads; one sentence per leftover.

    Blocking on purpose: it runs once at start, before any lease is wanted, and nothing may
    start until the previous incarnation's workloads are gone.
    """
    fence, entries = state.load()
    said: list[str] = []
    waits: list[tuple[int, int | None, float]] = []
    if fence is not None and alive(*fence):
        said.append(f"previous incarnation's fence pid {fence[0]} still runs; waiting for it")
        _signal_group(fence[0], signal.SIGTERM)
        waits.append(
            (fence[0], fence[1], max((e.stop_timeout for e in entries.values()), default=5.0) + 2)
        )
    for rec in entries.values():
        if not alive(rec.pid, rec.pid_start):
            continue
        said.append(
            f"{rec.app}: previous incarnation's workload pid {rec.pid} (token {rec.token}) "
            "still runs; stopping it before anything starts"
        )
        _signal_group(rec.pid, signal.SIGTERM)
        waits.append((rec.pid, rec.pid_start, rec.stop_timeout))
    for sentence in said:
        log.warning("leftover_stopping", msg=sentence)
    start = time.monotonic()
    for pid, pid_start, timeout in waits:
        while alive(pid, pid_start):
            if time.monotonic() - start >= timeout:
                _signal_group(pid, signal.SIGKILL)
            time.sleep(poll)
    state.entries.clear()
    state.fence = None
    state.save()
    return said
