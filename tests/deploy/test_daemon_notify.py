"""The real agent speaks sd_notify as the Type=notify unit expects: READY=1 once it has joined
the mesh, WATCHDOG=1 from its control loop, STOPPING=1 when it begins to stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.harness.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

# agent/daemon.py and agent/supervisor.py are the lead's: the calls are in the report.
# Not run until then (it would wait a minute for a READY=1 that never comes); with the diff
# applied it passed in 5 s, and without it, run, it failed waiting for READY=1.


def _receive(sock: socket.socket, deadline: float) -> list[str]:
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    return sock.recv(4096).decode().splitlines()


def test_agent_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    name = f"harmony-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(
        "site: notify\n"
        "node: n1\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"nats: {{embedded: true, listen: '127.0.0.1:{port}', "
        f"monitor_listen: '127.0.0.1:{free_port()}', servers: ['nats://127.0.0.1:{port}']}}\n"
        "mesh: {replicas: 1}\n"
        "lease: {ttl: 3s}\n"
        f"health: {{listen: '127.0.0.1:{free_port()}'}}\n"
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": "@" + name,
        "WATCHDOG_USEC": "10000000",
    }
    env.pop("HARMONY_AGENT_CONFIG", None)
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while "READY=1" not in seen:
            seen += _receive(sock, deadline)
        watchdogs = 0
        while watchdogs < 2:
            watchdogs += _receive(sock, deadline).count("WATCHDOG=1")
        agent.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen += _receive(sock, deadline)
        assert agent.wait(timeout=60) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        sock.close()
    assert any(line.startswith("STATUS=ready: notify/n1") for line in seen), seen
