"""Against real agents (``harmony-agent run``): workload output through ``logs``, the event
stream, the drain of a site's only placement, ``agent forget`` before and after the agent
stops, and a zero-configuration agent moved to other ports by HARMONY_AGENT_* variables."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from tests.cli.conftest import Invoke
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.ports import free_port
from tests.harness.wait import eventually

TICKER = [
    sys.executable,
    "-u",
    "-c",
    "import itertools, time\n"
    "for n in itertools.count():\n    print('tick', n)\n    time.sleep(0.2)",
]


def ticker_app() -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": "ticker"},
            "spec": {
                "trait": "stateful",
                "placement": {"sites": ["site-a"]},
                "score": {"kind": "Process", "command": TICKER, "stop_timeout": "1s"},
            },
        }
    )


def spawn_run(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``harmony-agent run`` without a config file, output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run"],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def run_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def agent(nats_server: NatsNode, tmp_path: Path) -> AsyncIterator[AgentProcess]:
    proc = AgentProcess(site="site-a", node="n1", workdir=tmp_path / "a", servers=[nats_server.url])
    proc.start()
    try:
        await eventually(proc.ready, timeout=30, what="agent ready")
        yield proc
    finally:
        proc.stop()


async def test_logs_events_drain_and_forget(
    nats_server: NatsNode, agent: AgentProcess, invoke: Invoke
) -> None:
    url = nats_server.url
    applied = await invoke("apply", "-f", "-", "-s", url, input=ticker_app())
    assert applied.exit_code == 0, applied.output

    async def ticks() -> str | None:
        r = await invoke("logs", "ticker", "--tail", "2", "-s", url)
        return r.stdout if r.exit_code == 0 and r.stdout.count("tick") == 2 else None

    out = await eventually(ticks, timeout=30, interval=0.3, what="workload output via logs")
    assert out is not None and out.splitlines()[-1].startswith("tick ")

    follow = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "logs", "ticker", "-f", "--tail", "0", "-s", url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert follow.stdout is not None
    try:
        first = await asyncio.wait_for(follow.stdout.readline(), 30)
        second = await asyncio.wait_for(follow.stdout.readline(), 30)
        n1, n2 = int(first.split()[1]), int(second.split()[1])
        assert n2 == n1 + 1  # consecutive lines: nothing lost or repeated between polls
    finally:
        follow.send_signal(signal.SIGINT)
        await follow.wait()

    events = await invoke("events", "--app", "ticker", "-o", "json", "-s", url)
    records = [json.loads(line) for line in events.stdout.splitlines()]
    audited = [r for r in records if r["subject"].startswith("harmony.audit.")]
    assert [(r["verb"], r["outcome"]) for r in audited] == [("apply", "created")]
    started = [r for r in records if r["subject"].startswith("harmony.events.")]
    assert started and started[0]["event"] == "started" and started[0]["agent"] == "site-a/n1"

    drained = await invoke("cmd", "drain", "site-a", "-s", url)
    assert drained.stdout == (
        "site site-a drained: ticker stops (no other undrained site in the placement); "
        "`cmd undrain site-a` lifts it\n"
    )

    refused = await invoke("agent", "forget", "site-a/n1", "-s", url)
    assert refused.exit_code == 1 and "site-a/n1 is alive" in refused.stderr
    assert agent.stop() == 0
    forgotten = await invoke("agent", "forget", "site-a/n1", "-s", url)
    assert forgotten.exit_code == 0, forgotten.output
    doc = json.loads((await invoke("status", "-o", "json", "-s", url)).stdout)
    assert doc["agents"] == []


async def test_zero_config_with_overrides(tmp_path: Path, invoke: Invoke) -> None:
    """No config file: the local defaults, with site, ports and state directory moved by
    HARMONY_AGENT_* variables; the CLI reaches it through HARMONY_NATS_URL."""
    nats_port, monitor, health = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HARMONY_")},
        "HARMONY_AGENT_SITE": "edge",
        "HARMONY_AGENT_NODE": "n1",
        "HARMONY_AGENT_STATE_DIR": str(tmp_path / "state"),
        "HARMONY_AGENT_NATS__LISTEN": f"127.0.0.1:{nats_port}",
        "HARMONY_AGENT_NATS__MONITOR_LISTEN": f"127.0.0.1:{monitor}",
        "HARMONY_AGENT_HEALTH__LISTEN": f"127.0.0.1:{health}",
        "HARMONY_AGENT_LOG__FORMAT": "json",
    }
    log = tmp_path / "agent.log"
    proc = spawn_run(env, log)
    probe = AgentProcess(site="edge", node="n1", workdir=tmp_path, servers=[], health_port=health)
    try:
        await eventually(probe.ready, timeout=60, what="zero-config agent ready")
        url = f"nats://127.0.0.1:{nats_port}"
        doc = json.loads((await invoke("status", "-o", "json", "-s", url)).stdout)
        assert [a["id"] for a in doc["agents"]] == ["edge/n1"]
        first = json.loads(log.read_text().splitlines()[0])
        assert first["event"] == "zero_config" and first["site"] == "edge"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0

    # Pointing it at servers switches zero-config off, and it says which variable did.
    servers = {"HARMONY_AGENT_NATS__SERVERS": f'["nats://127.0.0.1:{free_port()}"]'}
    log = tmp_path / "agent-off.log"
    proc = spawn_run({**env, **servers}, log)
    try:

        def said_why() -> dict[str, object] | None:
            for line in log.read_text().splitlines():
                record = json.loads(line)
                if record.get("event") == "zero_config_off":
                    return dict(record)
            return None

        record = await eventually(said_why, timeout=30, what="the zero_config_off log line")
        assert record["variables"] == ["HARMONY_AGENT_NATS__SERVERS"]
        assert "HARMONY_AGENT_NATS__SERVERS is set" in str(record["msg"])
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)

    without_site = {k: v for k, v in env.items() if k != "HARMONY_AGENT_SITE"}
    off = await asyncio.to_thread(run_once, {**without_site, **servers})
    assert off.returncode == 2
    assert off.stderr.splitlines() == [
        "harmony-agent: error: environment (zero-config off: HARMONY_AGENT_NATS__SERVERS is set): "
        "site: field required"
    ]
