"""The fence under a start storm: hundreds of spawns queued at once (issue 17).

The fence script is driven directly over its pipes, as ``FenceSupervisor`` does: a batch of
spawn commands must neither hide a session deadline written at the same time (every spawn
was refused "deadline already passed"), nor delay a kill that falls due meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from topologies.supervisor import FENCE


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@contextmanager
def fence() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-I", str(FENCE), "--parent", str(os.getpid()), "--session-fd", str(r)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=(r,),
    )
    os.close(r)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ev"] == "ready"
        yield proc, w
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the fence stops every workload and exits
        proc.wait(30)
        os.close(w)


def spawn(wid: str, log: Path, mode: str, deadline: float | None = None) -> bytes:
    cmd = {
        "op": "spawn",
        "id": wid,
        "argv": ["sleep", "60"],
        "env": {"PATH": os.environ.get("PATH", os.defpath)},
        "log": str(log),
        "stop_timeout": 1,
        "mode": mode,
        "deadline": deadline,
    }
    return json.dumps(cmd).encode() + b"\n"


def events(out: IO[bytes], count: int) -> list[dict[str, Any]]:
    """The next ``count`` started / spawn-failed / exited events, in order."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        line = out.readline()
        assert line, "the fence exited"
        ev = json.loads(line)
        if ev["ev"] in ("started", "spawn-failed", "exited"):
            got.append(ev)
    return got


def test_a_session_deadline_sent_with_a_batch_of_spawns_counts_for_all(tmp_path: Path) -> None:
    n = 100
    batch = b"".join(spawn(f"w{i}", tmp_path / f"w{i}.log", "follow") for i in range(n))
    assert len(batch) < 60_000, "the batch must fit in the pipe while the fence is stopped"
    with fence() as (proc, session):
        assert proc.stdin is not None and proc.stdout is not None
        # Paused, so that both pipes are readable when it looks: the deadline must not wait
        # behind the batch.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            proc.stdin.write(batch)
            proc.stdin.flush()
            os.write(session, f"{boottime() + 60!r}\n".encode())
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        got = events(proc.stdout, n)
    refused = [e for e in got if e["ev"] == "spawn-failed"]
    assert not refused, f"{len(refused)} of {n} spawns refused: {refused[0]}"


def _dead(pid: int) -> bool:
    """Killed: gone, or a zombie the fence has not reaped yet (it reaps after a batch)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_batch_of_spawns_does_not_delay_a_kill_that_falls_due(tmp_path: Path) -> None:
    """A fixed deadline falls due while the fence works through 600 spawns (it reads its
    commands 64 KB, about 300 spawns, at a time). The kill must come within the margin
    that covers the fence's reaction (ttl/10, 0.2 s at ttl 2), not after the batch."""
    n = 600
    with fence() as (proc, session):
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None
        os.write(session, f"{boottime() + 60!r}\n".encode())
        deadline = boottime() + 0.1
        stdin.write(spawn("due", tmp_path / "due.log", "fixed", deadline))
        stdin.flush()
        first = events(stdout, 1)[0]
        assert first["ev"] == "started", first
        got: list[dict[str, Any]] = []
        reader = threading.Thread(target=lambda: got.extend(events(stdout, n + 1)))
        reader.start()
        batch = b"".join(spawn(f"w{i}", tmp_path / f"w{i}.log", "follow") for i in range(n))
        writer = threading.Thread(target=lambda: (stdin.write(batch), stdin.flush()))
        writer.start()
        while not _dead(first["pid"]):
            time.sleep(0.002)
        died = boottime()
        started_then = sum(1 for e in got if e["ev"] == "started")
        writer.join(30)
        reader.join(60)
    assert started_then < n, "the batch was over before the deadline: this proves nothing"
    assert died - deadline <= 0.2, f"killed {died - deadline:.3f}s after its deadline"
    assert ("exited", "due", "deadline") in [(e["ev"], e["id"], e.get("reason")) for e in got]
