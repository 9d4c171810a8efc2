"""The fence: one small process per agent that starts workloads and enforces their deadlines.

Why a separate process: the agent's event loop can be paused (SIGSTOP), hung or killed, and
an AbsoluteConsistency workload must still die at its lease deadline. Why *one* for all
workloads: a Python interpreter per workload costs ~15 MB, so 1,000 workloads would need
15 GB for their guards. This process uses only the standard library and runs as a script
(``python -I fence.py --parent PID``).

What it guarantees, whatever the agent does:

* every workload is its child, in its own process group, and dies with it
  (PR_SET_PDEATHSIG=SIGKILL); on every exit path of the fence, each group is SIGKILLed;
* at a workload's deadline (CLOCK_BOOTTIME, so a suspend or VM freeze does not stretch it)
  its whole process group is SIGKILLed at once;
* when the agent dies (PR_SET_PDEATHSIG=SIGTERM, or EOF on stdin) every workload gets
  SIGTERM, then SIGKILL after its ``stop_timeout``, then the fence exits;
* workload output goes straight into its log file, rotated by copy-and-truncate.

Deadlines: a workload ``follows`` the session deadline (a float per line on the session fd,
written by the agent's session thread after each renewal, so renewals reach the fence even
while the agent's main loop is busy), or has a ``fixed`` deadline, or none (SplitBrainAllowed).
A lease claimed in fewer stores than the session is anchored in (until its claim is
repaired) follows its own ``group``: the session thread writes ``{"groups": {name:
deadline}}`` after the float, one deadline per claim support in use.

Protocol (one JSON object per line). stdin, from the agent's main loop:
``{"op": "spawn", "id", "argv", "env", "cwd", "uid", "gid", "log", "max_bytes", "backups",
"stop_timeout", "mode": "follow|fixed|none", "deadline", "group"}``, ``{"op": "deadline",
"id", "mode", "deadline", "group"}``, ``{"op": "stop", "id"}``, ``{"op": "kill", "id"}``.
stdout: ``{"ev": "started", "id", "pid"}``, ``{"ev": "spawn-failed", "id", "error"}``,
``{"ev": "exited", "id", "pid", "code", "reason": "exited|deadline|stopped|agent-gone"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
ROTATE_CHECK = 2.0
NEG_INF = float("-inf")
TICK = 0.1
"""Longest sleep: re-reading CLOCK_BOOTTIME this often bounds lateness after a resume."""
BATCH_CHECK = 0.02
"""While a batch of commands (a start storm) is processed, deadlines are still enforced
this often: spawning hundreds of workloads must not delay a kill that is due."""


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def set_pdeathsig(sig: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def clear_ambient_caps() -> None:
    """An unprivileged agent holds ambient CAP_SETUID/SETGID/KILL (the systemd unit gives
    them so that it can run workloads as another user). Ambient capabilities survive a
    switch between two non-root users and an exec: a workload would inherit them. Clear
    them in the child after the user switch; no privilege is needed to drop them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def emit(event: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    except OSError:
        # The agent is gone; swap stdout so the final flush does not raise again.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115


@dataclass
class Workload:
    id: str
    proc: subprocess.Popen[bytes]
    log_fd: int
    log_path: str
    max_bytes: int
    backups: int
    stop_timeout: float
    mode: str
    deadline: float | None
    group: str | None = None
    """With ``follow``: the claim support whose deadline (session fd) bounds it."""
    reason: str = "exited"
    kill_at: float | None = None

    @property
    def pgid(self) -> int:
        return self.proc.pid


class Fence:
    def __init__(self, parent: int, session_fd: int | None, setpriv: str | None = None) -> None:
        self.parent = parent
        self.setpriv = setpriv
        """``setpriv`` when it can set the parent-death signal (see ``find_setpriv``)."""
        self.session_fd = session_fd
        self.session_deadline = float("-inf")
        self.groups: dict[str, float] = {}
        """Claim support -> its deadline, from the session fd (see ``_limit``)."""
        self.workloads: dict[str, Workload] = {}
        self.by_pid: dict[int, str] = {}
        self.leaving = False
        self.next_rotate = now() + ROTATE_CHECK
        self.checked = float("-inf")
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)  # woken through the wakeup fd
        self.buffers: dict[int, bytes] = {0: b""}
        if session_fd is not None:
            os.set_blocking(session_fd, False)
            self.buffers[session_fd] = b""

    # --- commands ---------------------------------------------------------------------------

    def command(self, line: bytes) -> None:
        try:
            cmd = json.loads(line)
            op, wid = cmd["op"], str(cmd["id"])
        except (ValueError, KeyError, TypeError):
            return
        if op == "spawn":
            self.spawn(wid, cmd)
            return
        w = self.workloads.get(wid)
        if w is None:
            return
        if op == "deadline":
            w.mode = str(cmd.get("mode", "fixed"))
            value = cmd.get("deadline")
            w.deadline = float(value) if isinstance(value, int | float) else None
            group = cmd.get("group")
            w.group = group if isinstance(group, str) else None
        elif op == "stop":
            self.terminate(w, "stopped")
        elif op == "kill":
            w.reason = "stopped"
            killpg(w.pgid, signal.SIGKILL)

    def spawn(self, wid: str, cmd: dict[str, Any]) -> None:
        if wid in self.workloads:
            emit({"ev": "spawn-failed", "id": wid, "error": "already running"})
            return
        deadline = cmd.get("deadline")
        mode = str(cmd.get("mode", "none"))
        group = cmd.get("group") if isinstance(cmd.get("group"), str) else None
        fixed = float(deadline) if isinstance(deadline, int | float) else None
        self.refresh()
        limit = self._limit(mode, fixed, group)
        if limit is not None and now() >= limit:
            emit({"ev": "spawn-failed", "id": wid, "error": "deadline already passed"})
            return
        log_path = str(cmd["log"])
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as exc:
            emit({"ev": "spawn-failed", "id": wid, "error": f"log {log_path}: {exc}"})
            return
        uid, gid = cmd.get("uid"), cmd.get("gid")
        argv = [str(a) for a in cmd["argv"]]
        env = {str(k): str(v) for k, v in (cmd.get("env") or {}).items()}
        cwd = cmd.get("cwd") or None
        preexec: Any = _in_child
        if self.setpriv is not None and uid is None and gid is None:
            missing = _not_executable(argv[0] if argv else "", env, cwd)
            if missing is not None:
                os.close(log_fd)
                emit({"ev": "spawn-failed", "id": wid, "error": missing})
                return
            argv = [self.setpriv, "--pdeathsig", "KILL", "--ambient-caps", "-all", "--", *argv]
            preexec = None
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=uid if isinstance(uid, int) else None,
                group=gid if isinstance(gid, int) else None,
                # Drop the agent's supplementary groups with its user (needs CAP_SETGID,
                # which run_as needs anyway).
                extra_groups=[] if isinstance(uid, int) else None,
                preexec_fn=preexec,  # noqa: PLW1509 - the fence is single-threaded
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            os.close(log_fd)
            emit({"ev": "spawn-failed", "id": wid, "error": str(exc)})
            return
        self.workloads[wid] = Workload(
            wid,
            proc,
            log_fd,
            log_path,
            int(cmd.get("max_bytes") or 10 * 1024 * 1024),
            int(cmd.get("backups") or 0),
            float(cmd.get("stop_timeout") or 5.0),
            mode,
            fixed,
            group,
        )
        self.by_pid[proc.pid] = wid
        emit({"ev": "started", "id": wid, "pid": proc.pid})

    def terminate(self, w: Workload, reason: str) -> None:
        """SIGTERM the group, SIGKILL after stop_timeout. Its deadline still applies on its
        own (``enforce`` reads it every tick): a deadline that keeps moving, because the
        session is renewed while the agent stops its workloads, must not cut the graceful
        stop short, and one that stops moving still kills at once."""
        if w.kill_at is not None:
            return
        w.reason = reason
        w.kill_at = now() + w.stop_timeout
        killpg(w.pgid, signal.SIGTERM)

    def limit(self, w: Workload) -> float | None:
        return self._limit(w.mode, w.deadline, w.group)

    def _limit(self, mode: str, deadline: float | None, group: str | None) -> float | None:
        """``follow`` without a group: the anchored session deadline. With a group: that
        claim support's deadline from the session fd, or the one the agent sent with the
        command until the session thread has written it (both are promises already made,
        so the later one holds)."""
        if mode == "follow":
            if group is None:
                return self.session_deadline
            return max(NEG_INF if deadline is None else deadline, self.groups.get(group, NEG_INF))
        if mode == "fixed":
            return NEG_INF if deadline is None else deadline
        return None

    # --- the loop ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the newest session deadline before judging one. A start storm queues
        hundreds of spawns on stdin; a deadline written meanwhile must not wait behind
        them, or spawns are refused and running workloads killed on a stale value."""
        while self.session_fd is not None and self._readable(self.session_fd):
            self.read(self.session_fd)

    @staticmethod
    def _readable(fd: int) -> bool:
        ready, _, _ = select.select([fd], [], [], 0)
        return bool(ready)

    def enforce(self) -> float:
        """Kill what is due; return the next instant something becomes due."""
        self.refresh()
        t = self.checked = now()
        due = t + TICK
        for w in self.workloads.values():
            limit = self.limit(w)
            if limit is not None and t >= limit and w.reason != "deadline":
                w.reason = "deadline"
                killpg(w.pgid, signal.SIGKILL)
            elif limit is not None:
                due = min(due, limit)
            if w.kill_at is not None:
                if t >= w.kill_at:
                    killpg(w.pgid, signal.SIGKILL)
                else:
                    due = min(due, w.kill_at)
        return due

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wid = self.by_pid.pop(pid, None)
            w = self.workloads.pop(wid, None) if wid is not None else None
            if w is None:
                continue
            killpg(w.pgid, signal.SIGKILL)  # leftovers of the group must not outlive it
            with contextlib.suppress(OSError):
                os.close(w.log_fd)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            w.proc.returncode = code
            emit({"ev": "exited", "id": w.id, "pid": pid, "code": code, "reason": w.reason})

    def rotate(self) -> None:
        for w in self.workloads.values():
            with contextlib.suppress(OSError):
                if os.fstat(w.log_fd).st_size > w.max_bytes:
                    for index in range(w.backups - 1, 0, -1):
                        older = f"{w.log_path}.{index}"
                        if os.path.exists(older):
                            os.replace(older, f"{w.log_path}.{index + 1}")
                    if w.backups > 0:
                        shutil.copyfile(w.log_path, f"{w.log_path}.1")
                    os.ftruncate(w.log_fd, 0)

    def read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            if fd == 0:
                self.leave()
            else:
                self.session_fd = None
            return
        buffer = self.buffers.get(fd, b"") + chunk
        *lines, rest = buffer.split(b"\n")
        self.buffers[fd] = rest
        for line in lines:
            if fd == 0:
                self.command(line)
                if now() >= self.checked + BATCH_CHECK:
                    self.enforce()
            elif line.startswith(b"{"):
                self.read_groups(line)
            else:
                with contextlib.suppress(ValueError):
                    self.session_deadline = float(line)

    def read_groups(self, line: bytes) -> None:
        """``{"groups": {name: deadline}}``: every claim support in use, as of a renewal."""
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
            groups = json.loads(line)["groups"]
            self.groups = {str(g): float(d) for g, d in groups.items()}

    def leave(self) -> None:
        """The agent is gone: stop everything gracefully, then exit when all are gone."""
        if not self.leaving:
            self.leaving = True
            for w in self.workloads.values():
                self.terminate(w, "agent-gone")

    def run(self) -> None:
        while not (self.leaving and not self.workloads):
            due = self.enforce()
            if os.getppid() != self.parent:
                self.leave()
            fds = [self.wake_r] + ([0] if not self.leaving else [])
            if self.session_fd is not None:
                fds.append(self.session_fd)
            timeout = max(0.0, min(due - now(), TICK))
            ready, _, _ = select.select(fds, [], [], timeout)
            if self.wake_r in ready:
                signums = os.read(self.wake_r, 512)
                if set(signums) & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
                    self.leave()
            if self.session_fd in ready:
                self.refresh()  # the newest deadline before any command
            if 0 in ready:
                self.read(0)
            self.reap()
            if now() >= self.next_rotate:
                self.rotate()
                self.next_rotate = now() + ROTATE_CHECK

    def kill_all(self) -> None:
        for w in self.workloads.values():
            killpg(w.pgid, signal.SIGKILL)


def _in_child() -> None:
    """Runs in the workload's process after the user switch, before exec."""
    set_pdeathsig(signal.SIGKILL)
    clear_ambient_caps()


def find_setpriv() -> str | None:
    """util-linux ``setpriv --pdeathsig KILL -- argv`` sets the parent-death signal and
    execs the workload (same pid, same argv). Python's ``preexec_fn`` does the same but
    forces a full fork of the interpreter: about 4 ms a spawn against 0.6-1.6 ms, which is
    most of a start storm of hundreds of workloads (issue 17). Used when it works here."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "--pdeathsig", "KILL", "--ambient-caps", "-all", "--", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path if done.returncode == 0 else None


def _not_executable(program: str, env: dict[str, str], cwd: str | None) -> str | None:
    """Why ``program`` cannot be executed, worded as Popen would say it (None: it can).
    With ``setpriv`` in front, a missing program would otherwise start and exit 127."""
    if "/" in program:
        path: str | None = os.path.join(cwd or os.getcwd(), program)
    else:
        path = shutil.which(program, path=env.get("PATH", os.defpath))
    if path is None or not os.path.isfile(path):
        return str(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program))
    if not os.access(path, os.X_OK):
        return str(PermissionError(errno.EACCES, os.strerror(errno.EACCES), program))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harmony-fence")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--session-fd", type=int, default=None)
    args = parser.parse_args(argv)
    set_pdeathsig(signal.SIGTERM)
    if os.getppid() != args.parent:
        return 1  # the agent died before we could watch it
    fence = Fence(args.parent, args.session_fd, find_setpriv())
    emit({"ev": "ready", "id": "", "pid": os.getpid()})
    try:
        fence.run()
    finally:
        fence.kill_all()  # every exit path: no group outlives the fence
    return 0


if __name__ == "__main__":
    sys.exit(main())
