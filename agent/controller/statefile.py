"""Restart safety: which workload processes this agent started, in a 0600 file.

A Process workload dies with its agent (the guard has PR_SET_PDEATHSIG), but not at once:
the guard gives it ``stop_timeout`` to exit after SIGTERM. An agent restarted within that
window must not start a second copy beside the dying first one. So every start records the
guard and workload pids (with their kernel start times, so a recycled pid is never mistaken
for ours) in ``<state_dir>/controller/instances.json``; a starting controller stops whatever
of it still runs, and waits until it is gone, before it contends for any lease.
"""

from __future__ import annotations

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
    guard_pid: int | None
    guard_start: int | None
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

    def load(self) -> dict[str, Recorded]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        out: dict[str, Recorded] = {}
        if isinstance(raw, dict):
            for app, entry in raw.items():
                with contextlib.suppress(TypeError, ValueError):
                    out[app] = Recorded(**entry)
        return out

    def save(self, entries: dict[str, Recorded]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as fh:
            json.dump({k: asdict(v) for k, v in entries.items()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def record(self, entry: Recorded) -> None:
        entries = self.load()
        entries[entry.app] = entry
        self.save(entries)

    def forget(self, app: str) -> None:
        entries = self.load()
        if entries.pop(app, None) is not None:
            self.save(entries)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_leftovers(state: StateFile, *, poll: float = 0.02) -> list[str]:
    """Stop every recorded process that still runs; return one sentence per leftover.

    Blocking on purpose: it runs once at start, before any lease is wanted, and nothing may
    start until the previous incarnation's workloads are gone.
    """
    said: list[str] = []
    for rec in state.load().values():
        workload = alive(rec.pid, rec.pid_start)
        guard = alive(rec.guard_pid, rec.guard_start)
        if not workload and not guard:
            continue
        said.append(
            f"{rec.app}: previous incarnation's workload pid {rec.pid} (token {rec.token}) "
            "still runs; stopping it before anything starts"
        )
        log.warning(said[-1])
        if workload:
            _signal_group(rec.pid, signal.SIGTERM)
        if guard and rec.guard_pid is not None:
            _signal_group(rec.guard_pid, signal.SIGTERM)
        kill_at = time.monotonic() + rec.stop_timeout
        while alive(rec.pid, rec.pid_start) or alive(rec.guard_pid, rec.guard_start):
            if time.monotonic() >= kill_at:
                _signal_group(rec.pid, signal.SIGKILL)
                if rec.guard_pid is not None:
                    _signal_group(rec.guard_pid, signal.SIGKILL)
            time.sleep(poll)
    state.save({})
    return said
