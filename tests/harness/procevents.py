"""Workload lifetimes from the kernel: exec and exit events of the proc connector.

Why not the ticker (``tests/workloads/ticker.py``): a Python interpreter per workload costs
about 10 MB, so hundreds or a thousand applications cannot each run one on a small machine,
and ticks only bound an instance's life to their interval. The kernel's proc connector
(netlink, root only) reports every ``exec`` and ``exit`` on the machine with its
CLOCK_MONOTONIC time, whatever network namespace the process runs in, so a workload such as
``sleep 100000.<i>`` costs nothing and its life is known to the nanosecond: started at the
exec, ended at the exit, even when SIGKILLed at a lease deadline.

``ProcHistory`` turns the events of the processes whose command line matches into
``history.Instance`` values, so ``history.overlaps`` checks them like ticker histories. A
process still running ends "now" (the moment ``instances()`` is called). If the kernel had
to drop events (the socket overflowed), ``dropped`` says so and the history is incomplete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass

from tests.harness import history

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
PROC_EVENT_EXEC = 0x2
PROC_EVENT_EXIT = 0x80000000
_HEADER = 16 + 20  # nlmsghdr + cn_msg
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_PIDS = struct.Struct("=ii")  # process_pid, process_tgid (exec and exit start alike)


@dataclass
class _Life:
    app: str
    site: str
    pid: int
    token: int
    start_ns: int
    end_ns: int | None = None


def _read_env(pid: int) -> dict[str, str]:
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()  # noqa: SIM115 - tiny, closed by GC
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.startswith(b"HARMONY_"):
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


class ProcHistory:
    """Lives of the processes whose ``argv`` (NUL-joined) matches ``pattern``; the first
    group of the match names the application. Site and token come from the workload's
    ``HARMONY_SITE`` and ``HARMONY_FENCING_TOKEN`` (CONTRACT section 4)."""

    def __init__(self, pattern: bytes) -> None:
        self.pattern = re.compile(pattern)
        self.dropped = 0
        self._lives: dict[int, _Life] = {}
        self._done: list[_Life] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _control(self, op: int) -> None:
        assert self._sock is not None
        payload = struct.pack("=I", op)
        cn = struct.pack("=IIIIHH", CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        self._sock.send(struct.pack("=IHHII", 16 + len(cn), NLMSG_DONE, 0, 0, 0) + cn)

    def start(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        with contextlib.suppress(OSError):  # root may exceed rmem_max
            sock.setsockopt(socket.SOL_SOCKET, 33, 8 * 1024 * 1024)  # SO_RCVBUFFORCE
        sock.bind((0, CN_IDX_PROC))
        sock.settimeout(0.2)
        self._sock = sock
        self._control(PROC_CN_MCAST_LISTEN)
        self._thread = threading.Thread(target=self._run, name="proc-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._control(PROC_CN_MCAST_IGNORE)
            self._sock.close()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.dropped += 1
                    continue
                return
            offset = 0
            while offset + _HEADER + _EVENT.size <= len(data):
                length = struct.unpack_from("=I", data, offset)[0]
                self._event(data, offset + _HEADER)
                offset += max(length, _HEADER + _EVENT.size)

    def _event(self, data: bytes, at: int) -> None:
        what, _, ts = _EVENT.unpack_from(data, at)
        pid, tgid = _PIDS.unpack_from(data, at + _EVENT.size)
        if pid != tgid:
            return  # a thread, not a process
        if what == PROC_EVENT_EXEC:
            try:
                argv = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: SIM115
            except OSError:
                return
            m = self.pattern.match(argv)
            if m is None:
                return
            env = _read_env(pid)
            token = env.get("HARMONY_FENCING_TOKEN", "0")
            life = _Life(
                m.group(1).decode(),
                env.get("HARMONY_SITE", "?"),
                pid,
                int(token) if token.isdigit() else 0,
                ts,
            )
            with self._lock:
                # Exec'd again without exiting (a launcher such as ``setpriv`` that execs
                # the workload, read late): the same process, alive since the first exec.
                self._lives.setdefault(pid, life)
        elif what == PROC_EVENT_EXIT:
            with self._lock:
                ended = self._lives.pop(pid, None)
                if ended is not None:
                    ended.end_ns = ts
                    self._done.append(ended)

    def running(self) -> dict[str, list[int]]:
        """Application -> pids of its live processes, as the events tell."""
        out: dict[str, list[int]] = {}
        with self._lock:
            for life in self._lives.values():
                out.setdefault(life.app, []).append(life.pid)
        return out

    def instances(self) -> list[history.Instance]:
        """Every life seen so far, as ``history.Instance`` (one tick at each end)."""
        now = time.monotonic_ns()
        with self._lock:
            lives = [*self._done, *self._lives.values()]
        out = []
        for life in lives:
            end = life.end_ns if life.end_ns is not None else now
            span = end - life.start_ns
            out.append(
                history.Instance(
                    life.app, life.site, life.pid, life.token, life.start_ns, end, 2, span
                )
            )
        out.sort(key=lambda i: (i.first_ns, i.key))
        return out


def available() -> bool:
    """The proc connector can be used here (root, kernel built with CONFIG_PROC_EVENTS)."""
    if os.geteuid() != 0:
        return False
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError:
        return False
    with sock:
        try:
            sock.bind((0, CN_IDX_PROC))
        except OSError:
            return False
    return True
