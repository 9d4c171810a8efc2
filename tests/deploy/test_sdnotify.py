"""agent.sdnotify against real AF_UNIX datagram sockets, as systemd binds them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdnotify

ROOT = Path(__file__).resolve().parents[2]


def _bind(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    return sock


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """A bound datagram socket and $NOTIFY_SOCKET naming it (a path or an abstract name)."""
    if request.param == "path":
        path = tmp_path / "notify.sock"
        sock = _bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    else:
        name = f"harmony-test-{uuid.uuid4().hex}"
        sock = _bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    with sock:
        yield sock


def _messages(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_status_watchdog_stopping_reach_the_socket(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("mesh joined\nsite a")
    assert _messages(notify_socket) == {"READY": "1", "STATUS": "mesh joined site a"}
    assert sdnotify.status("3 applications")
    assert _messages(notify_socket) == {"STATUS": "3 applications"}
    assert sdnotify.watchdog()
    assert _messages(notify_socket) == {"WATCHDOG": "1"}
    assert sdnotify.stopping("releasing leases")
    assert _messages(notify_socket) == {"STOPPING": "1", "STATUS": "releasing leases"}


def test_a_child_process_pings_the_watchdog_it_was_given(notify_socket: socket.socket) -> None:
    """What systemd sees from a service: $WATCHDOG_PID is the service's own pid."""
    script = (
        "import os, sys\n"
        "from agent import sdnotify\n"
        "os.environ['WATCHDOG_PID'] = str(os.getpid())\n"
        "interval = sdnotify.watchdog_interval()\n"
        "assert interval == 1.5, interval\n"
        "for _ in range(3):\n"
        "    assert sdnotify.watchdog()\n"
    )
    env = {**os.environ, "WATCHDOG_USEC": "3000000"}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=60)
    assert [_messages(notify_socket) for _ in range(3)] == [{"WATCHDOG": "1"}] * 3


def test_without_a_notify_socket_every_call_is_a_quiet_no_op(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready() and not sdnotify.watchdog() and not sdnotify.stopping()
    # A socket that went away (the service manager restarted) must not raise either.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert not sdnotify.watchdog()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # meant for another pid
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(env) == expected
