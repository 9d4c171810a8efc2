"""Deadline watchdog for one PostgreSQL instance: the part of fencing that must not hang.

Copied by the PostgreSQL Score into the instance's run directory on the database host and run
there as the database's OS user with ``python3 -I watchdog.py ...`` (standard library only,
so it works on a host that has nothing of the agent). Subcommands:

``start --state S --deadline-file D --log L [--deadline T] [--stop-timeout N] -- postgres ...``
    Detach (fork, setsid), become a child subreaper, start postgres as a child with
    PR_SET_PDEATHSIG=SIGKILL, print ``{"watchdog": pid, "postgres": pid}`` (or
    ``{"error": ...}``) and return; the detached watchdog then

    * kills the postmaster and every process below it the moment CLOCK_BOOTTIME passes the
      deadline, so no commit can be acknowledged afterwards: SIGSTOP to the postmaster (it
      can fork no more), SIGKILL to all its descendants, then to it. (A process-group kill
      would not do: every PostgreSQL backend calls setsid() and leads its own group.) The deadline
      is the last number written to the deadline file (``none`` = no deadline; a missing or
      unreadable file keeps the previous value, so a failed write never extends it). The file
      is re-read at least every 0.2 s and right at the deadline, so an extension written in
      time always counts;
    * on SIGTERM asks postgres for a fast shutdown and SIGKILLs the group after the stop
      timeout (never later than the deadline);
    * wakes up on SIGUSR1 to re-read the deadline file at once (sent when a deadline is set
      on a running replica that is being promoted);
    * writes its state (``running``, then ``exited`` with the reason: ``exited`` or
      ``deadline``) to the state file, atomically, and exits when postgres has exited.

    It does not die with the agent: a restarted agent adopts the running instance. A hung or
    dead agent stops extending the deadline, which is what fences the instance.

``check-port LISTEN PORT``  exit 0 if postgres could listen there, 3 if in use, 4 if the address
    is not on this host.
``clock``  print CLOCK_BOOTTIME.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL = 0.2
PRESCAN = 0.05
"""This long before the deadline the process tree is listed, so the kill needs no scan."""


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def note(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with contextlib.suppress(OSError):
        sys.stderr.write(f"{stamp} [harmony-watchdog {os.getpid()}] {message}\n")
        sys.stderr.flush()


def write_json(path: str, data: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        json.dump(data, out)
    os.replace(tmp, path)


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def descendants(roots: set[int]) -> set[int]:
    """Every live process below ``roots`` (by parent pid), from one /proc snapshot."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def kill_tree(postmaster: int, known: set[int] | None = None) -> tuple[int, float]:
    """Freeze the postmaster, SIGKILL everything below it and itself.

    ``known`` (descendants listed just before the deadline) are killed first, without
    waiting for a /proc scan; then the tree is rescanned until nothing is left. Returns how
    many processes were hit and the CLOCK_BOOTTIME of the first SIGKILL batch.
    """
    signal_pid(postmaster, signal.SIGSTOP)
    for pid in known or ():
        signal_pid(pid, signal.SIGKILL)
    first = boottime()
    me = os.getpid()
    hit = set(known or ())
    for _ in range(5):  # again for anything that raced (orphans are reparented to us)
        victims = descendants({postmaster, me}) - {me}
        for pid in victims:
            signal_pid(pid, signal.SIGKILL)
        hit |= victims
        if not victims:
            break
    signal_pid(postmaster, signal.SIGKILL)
    return len(hit), first


class DeadlineFile:
    """The deadline as last written; re-parsed only when the file changed."""

    def __init__(self, path: str, initial: float | None) -> None:
        self.path = path
        self.value = initial
        self._seen: tuple[int, int, int] | None = None

    def read(self) -> float | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return self.value
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._seen:
            return self.value
        try:
            with open(self.path) as fh:
                text = fh.read().strip()
        except OSError:
            return self.value
        if text == "none":
            self.value = None
        else:
            try:
                self.value = float(text)
            except ValueError:
                note(f"ignored unreadable deadline {text[:40]!r}")
                return self.value
        self._seen = key
        return self.value


class Watchdog:
    def __init__(self, args: argparse.Namespace, report_fd: int) -> None:
        self.args = args
        self.report_fd: int | None = report_fd
        self.deadline = DeadlineFile(args.deadline_file, args.deadline)
        self.reason = "exited"
        self.kill_at: float | None = None
        self.prescan: tuple[float, set[int]] | None = None  # (for deadline, descendants)
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)

    def report(self, data: dict[str, object]) -> None:
        if self.report_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.report_fd, json.dumps(data).encode())
        os.close(self.report_fd)
        self.report_fd = None

    def state(self, **fields: object) -> None:
        write_json(self.args.state, {"watchdog": os.getpid(), **fields})

    def run(self) -> int:
        me = os.getpid()

        def in_child() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != me:  # the watchdog died before prctl took effect
                os._exit(1)

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphaned backends stay ours to kill
        first = self.deadline.read()
        if first is not None and boottime() >= first:
            self.state(state="exited", reason="deadline", returncode=None, postgres=None)
            self.report({"error": "lease deadline already passed: not starting"})
            return 1
        try:
            proc = subprocess.Popen(
                self.args.command,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=in_child,  # noqa: PLW1509 - single-threaded, fork is safe
            )
        except OSError as exc:
            self.state(state="exited", reason="spawn-failed", error=str(exc), postgres=None)
            self.report({"error": f"cannot start {self.args.command[0]}: {exc}"})
            return 1
        self.state(state="running", postgres=proc.pid, started=boottime())
        note(f"started postgres pid {proc.pid}; deadline {first}")
        self.report({"watchdog": me, "postgres": proc.pid})
        late = self.loop(proc)
        kill_tree(proc.pid)  # leftovers (backends of a postmaster that died)
        self.state(
            state="exited",
            reason=self.reason,
            returncode=proc.returncode,
            postgres=proc.pid,
            late=late,
            at=boottime(),
        )
        note(f"postgres pid {proc.pid} ended with {proc.returncode} ({self.reason})")
        return 0

    def loop(self, proc: subprocess.Popen[bytes]) -> float | None:
        me = os.getpid()
        while proc.poll() is None:
            now = boottime()
            deadline = self.deadline.read()
            if deadline is not None and now >= deadline:
                known = self.prescan[1] if self.prescan and self.prescan[0] == deadline else None
                hit, first = kill_tree(proc.pid, known)
                self.reason = "deadline"
                note(
                    f"lease deadline passed: SIGKILL to postmaster {proc.pid} and {hit} more, "
                    f"{(first - deadline) * 1000:.1f} ms late"
                )
                proc.wait()
                return first - deadline
            stale = self.prescan is None or self.prescan[0] != deadline
            if deadline is not None and deadline - now <= PRESCAN and stale:
                self.prescan = (deadline, descendants({proc.pid, me}) - {me})
            if self.kill_at is not None and now >= self.kill_at:
                note(f"still running after the stop timeout: SIGKILL to postmaster {proc.pid}")
                kill_tree(proc.pid)
                self.kill_at = None
            wait = POLL
            for moment in (deadline, self.kill_at):
                if moment is not None:
                    wait = min(wait, max(0.0, moment - now))
            if deadline is not None and (self.prescan is None or self.prescan[0] != deadline):
                wait = min(wait, max(0.0, deadline - PRESCAN - now))
            ready, _, _ = select.select([self.wake_r], [], [], wait)
            if ready:
                signums = os.read(self.wake_r, 512)
                if set(signums) & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
                    self.terminate(proc)
        return None

    def terminate(self, proc: subprocess.Popen[bytes]) -> None:
        if self.kill_at is not None:
            return
        note("asked to stop: fast shutdown (SIGINT) to postgres")
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        self.reason = "stopped"
        self.kill_at = boottime() + self.args.stop_timeout


def start(args: argparse.Namespace) -> int:
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(report_w)
        chunks: list[bytes] = []
        end = time.monotonic() + 30
        while time.monotonic() < end:
            ready, _, _ = select.select([report_r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                break
            chunk = os.read(report_r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        text = b"".join(chunks).decode(errors="replace") or '{"error": "watchdog said nothing"}'
        print(text, flush=True)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return 0 if '"error"' not in text else 1
    os.close(report_r)
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        # A second fork: the watchdog is nobody's session leader and cannot get a terminal.
        if os.fork():
            os._exit(0)
        code = Watchdog(args, report_w).run()
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    os._exit(code)


def check_port(listen: str, port: int) -> int:
    hosts = [h.strip() for h in listen.split(",") if h.strip()]
    for host in hosts:
        if host == "*":
            targets = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
        else:
            try:
                infos = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            except socket.gaierror as exc:
                print(f"cannot resolve listen address {host!r}: {exc}")
                return 4
            targets = [(info[0], str(info[4][0])) for info in infos]
        for family, address in targets:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError:
                continue  # e.g. IPv6 disabled: postgres skips it too
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, port))
                sock.listen(1)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    print(f"port {port} on {address} is already in use")
                    return 3
                if exc.errno == errno.EADDRNOTAVAIL:
                    print(f"listen address {address} is not an address of this host")
                    return 4
                if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT,):
                    continue
                print(f"cannot listen on {address}:{port}: {exc}")
                return 4
            finally:
                sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="harmony-pg-watchdog")
    sub = parser.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("start")
    run.add_argument("--state", required=True)
    run.add_argument("--deadline-file", required=True)
    run.add_argument("--log", required=True)
    run.add_argument("--deadline", type=float, default=None)
    run.add_argument("--stop-timeout", type=float, default=30.0)
    run.add_argument("command", nargs="+")
    port = sub.add_parser("check-port")
    port.add_argument("listen")
    port.add_argument("port", type=int)
    sub.add_parser("clock")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.verb == "start":
        return start(args)
    if args.verb == "check-port":
        return check_port(args.listen, args.port)
    print(repr(boottime()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
