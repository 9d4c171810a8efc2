"""Guard process: one per Process workload, the part of supervision that must not hang.

The agent's event loop can be paused (SIGSTOP), hung or killed; the lease deadline must hold
anyway. So a small separate process, which only uses the standard library and can run as a
script (``python -I guard.py``), owns the workload:

* it dies with the agent (PR_SET_PDEATHSIG=SIGTERM, then EOF on stdin) and takes the
  workload's process group down with it (SIGTERM, SIGKILL after ``--stop-timeout``);
* the workload, in its own session, dies with the guard (PR_SET_PDEATHSIG=SIGKILL);
* at the deadline it SIGKILLs the workload's process group at once, whatever the agent does;
* it copies the workload's output into a size-rotated log file.

Protocol. stdin, one command a line: ``deadline <monotonic seconds>``, ``clear``, ``stop``.
stdout, one JSON event a line: ``{"event": "started", "pid": N}``,
``{"event": "spawn-failed", "error": "..."}``,
``{"event": "exited", "returncode": N, "reason": "exited|deadline|stopped|agent-gone"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int) -> None:
    """Ask Linux to send ``sig`` when our parent (thread) dies; best effort elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class RotatingLog:
    """Append-only log that keeps ``backups`` old files of at most ``max_bytes`` each."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the guard
        self._size = self._fh.tell()

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        self._fh.write(data)
        self._size += len(data)

    def _rotate(self) -> None:
        self._fh.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self._size = 0

    def note(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.write(f"{stamp} [harmony-guard] {message}\n".encode())


def emit(event: dict[str, object]) -> None:
    try:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    except OSError:
        # The agent is gone; the log file still tells the story. Swap stdout so the
        # interpreter's final flush does not print a BrokenPipeError traceback.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115


def killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Guard:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline: float | None = args.deadline
        self.log = RotatingLog(Path(args.log), args.max_bytes, args.backups)
        self.reason = "exited"
        self.terminating = False
        self.kill_at: float | None = None  # SIGKILL escalation after a SIGTERM
        self.out_open = True
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdin_open = True
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)  # woken through the wakeup fd

    def spawn(self) -> bool:
        guard_pid = os.getpid()

        def in_child() -> None:
            set_pdeathsig(signal.SIGKILL)
            if os.getppid() != guard_pid:  # the guard died before prctl took effect
                os._exit(1)

        try:
            self.proc = subprocess.Popen(
                self.args.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.args.cwd,
                start_new_session=True,
                preexec_fn=in_child,  # noqa: PLW1509 - single-threaded guard, fork is safe
            )
        except OSError as exc:
            self.log.note(f"cannot start {self.args.command!r}: {exc}")
            emit({"event": "spawn-failed", "error": str(exc)})
            return False
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.log.note(f"started pid {self.proc.pid}: {' '.join(self.args.command)}")
        emit({"event": "started", "pid": self.proc.pid})
        return True

    def terminate(self, reason: str) -> None:
        """SIGTERM the group, SIGKILL after stop-timeout, never later than the deadline."""
        if self.terminating:
            return
        assert self.proc is not None
        self.terminating = True
        self.reason = reason
        self.kill_at = time.monotonic() + self.args.stop_timeout
        if self.deadline is not None:
            self.kill_at = min(self.kill_at, self.deadline)
        self.log.note(f"{reason}: SIGTERM to process group {self.proc.pid}")
        killpg(self.proc.pid, signal.SIGTERM)

    def handle_command(self, line: str) -> None:
        verb, _, value = line.strip().partition(" ")
        if verb == "deadline":
            try:
                self.deadline = float(value)
            except ValueError:
                self.log.note(f"ignored bad deadline {value!r}")
        elif verb == "clear":
            self.deadline = None
        elif verb == "stop":
            self.terminate("stopped")

    def timeout(self) -> float | None:
        moments = [m for m in (self.deadline, self.kill_at) if m is not None]
        return max(0.0, min(moments) - time.monotonic()) if moments else None

    def run(self) -> int:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        out_fd, buffer = proc.stdout.fileno(), b""
        while proc.poll() is None:
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                self.reason = "deadline"
                killpg(proc.pid, signal.SIGKILL)
                self.log.note(f"deadline passed: SIGKILL to process group {proc.pid}")
                proc.wait()
                break
            if self.kill_at is not None and now >= self.kill_at:
                self.log.note(f"still running: SIGKILL to process group {proc.pid}")
                killpg(proc.pid, signal.SIGKILL)
                self.kill_at = None
            watched = [self.wake_r]
            watched += [out_fd] if self.out_open else []
            watched += [0] if self.stdin_open else []
            ready, _, _ = select.select(watched, [], [], self.timeout())
            if self.wake_r in ready:
                self._on_signals(os.read(self.wake_r, 512))
            if out_fd in ready:
                self.out_open = self._pump(out_fd)
            if 0 in ready:
                buffer = self._read_commands(buffer)
        killpg(proc.pid, signal.SIGKILL)  # leftovers of the group must not outlive the leader
        self._drain(out_fd)
        code = proc.returncode
        self.log.note(f"pid {proc.pid} ended with {code} ({self.reason})")
        emit({"event": "exited", "returncode": code, "reason": self.reason})
        return 0

    def _on_signals(self, signums: bytes) -> None:
        if os.getppid() != self.args.parent:
            self.terminate("agent-gone")
        elif set(signums) & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
            self.terminate("stopped")

    def _read_commands(self, buffer: bytes) -> bytes:
        chunk = os.read(0, 4096)
        if not chunk:
            self.stdin_open = False
            self.terminate("agent-gone")
            return buffer
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            self.handle_command(line.decode(errors="replace"))
        return buffer

    def _pump(self, fd: int) -> bool:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if data:
            self.log.write(data)
        return bool(data)

    def _drain(self, fd: int) -> None:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            if not ready or not self._pump(fd):
                return


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="harmony-guard")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--max-bytes", type=int, default=10 * 1024 * 1024)
    parser.add_argument("--backups", type=int, default=3)
    parser.add_argument("--stop-timeout", type=float, default=5.0)
    parser.add_argument("--deadline", type=float, default=None)
    parser.add_argument("--cwd", default=None)
    parser.add_argument("command", nargs="+")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    set_pdeathsig(signal.SIGTERM)
    if os.getppid() != args.parent:
        return 1  # the agent died before we could watch it: start nothing
    guard = Guard(args)
    if args.deadline is not None and time.monotonic() >= args.deadline:
        guard.log.note("deadline already passed: not starting")
        emit({"event": "spawn-failed", "error": "deadline already passed"})
        return 0
    if not guard.spawn():
        return 0
    return guard.run()


if __name__ == "__main__":
    sys.exit(main())
