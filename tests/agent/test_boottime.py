"""Issue 9 item 11, end to end: the session's deadlines reach the fence on CLOCK_BOOTTIME.

On a machine that was never suspended CLOCK_BOOTTIME and CLOCK_MONOTONIC agree, so a session
on the wrong clock passes every other test. Here the agent runs in a time namespace whose
CLOCK_BOOTTIME is far ahead of its CLOCK_MONOTONIC (what any machine shows after a suspend):
a session that measured its validity on CLOCK_MONOTONIC would hand the fence deadlines that
lie in its past, and the fence would refuse to start, or kill, every AbsoluteConsistency
workload.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from mesh.names import STATE_BUCKET, session_key, store_bucket
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

TTL = 2.0
AHEAD = 1000


def _time_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--time", "--boottime", "1", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.fixture
async def agent(tmp_path: Path, nats_server: NatsNode) -> AsyncIterator[AgentProcess]:
    if not _time_namespaces():
        pytest.skip("needs root and unshare --time (Linux >= 5.6)")
    proc = AgentProcess(
        site="site-a",
        node="n1",
        workdir=tmp_path / "agent",
        servers=[nats_server.url],
        ttl=f"{TTL}s",
        extra={"mesh": {"stores": ["site-a"]}},
        wrap=("unshare", "--time", "--boottime", str(AHEAD)),
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
async def client(nats_server: NatsNode) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


def pids(marker: Path) -> list[int]:
    return [int(p) for p in marker.read_text().split()] if marker.exists() else []


async def test_a_holder_whose_boottime_runs_ahead_keeps_its_workload(
    agent: AgentProcess, client: Client, tmp_path: Path
) -> None:
    await eventually(agent.ready, timeout=60, what="agent ready")
    marker = tmp_path / "ledger.pids"
    app = {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": "ledger"},
        "spec": {
            "trait": "stateful",
            "failover": {"strategy": "AbsoluteConsistency"},
            "placement": {"sites": ["site-a"]},
            "score": {
                "kind": "Process",
                "command": [
                    sys.executable,
                    "-c",
                    f"import os, time; open({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n');"
                    " time.sleep(3600)",
                ],
                "stop_timeout": "1s",
            },
        },
    }
    kv = await client.jetstream(timeout=5).key_value(STATE_BUCKET)
    await kv.put("app.ledger", json.dumps(app).encode())
    first = await eventually(lambda: pids(marker), timeout=30, what="ledger started")
    # Six renewals (two ttls): each one moves the fence's deadline; none may lie in its past.
    store = await client.jetstream(timeout=5).key_value(store_bucket("site-a"))
    key = session_key(agent.site, agent.node)
    start = (await store.get(key)).revision or 0

    async def renewed() -> bool:
        return ((await store.get(key)).revision or 0) >= start + 6

    await eventually(renewed, timeout=10 * TTL, what="six session renewals")
    assert pids(marker) == first, "the workload was restarted: its deadline was on another clock"
    log = agent.log(2_000_000)
    assert "deadline already passed" not in log, log[-3000:]
    assert "killed at the lease deadline" not in log, log[-3000:]
