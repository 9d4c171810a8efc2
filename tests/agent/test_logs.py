"""Log lines: JSON lines with a stable ``event`` name and the sentence in ``msg``, site and
node on every line (the session thread's too), deadlines as wall-clock UTC, one line per
refused command, ``ping`` at debug. In-process for the format, then a real agent's log."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog

from agent.application import Application
from agent.health import HealthServer
from agent.logs import configure
from mesh.clock import boottime, wall_iso
from mesh.names import STATE_BUCKET, agent_cmd_subject, app_key
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.ports import free_port
from tests.harness.wait import eventually

NAME = re.compile(r"^[a-z][a-z0-9_]*$")
NOT_CONVERTED: set[str] = set()
"""Every module logs a stable event name now (the sentence goes in ``msg``)."""


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


async def test_json_lines_have_event_msg_site_and_node_from_every_thread(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure("debug", "json", site="site-a", node="n1")
    try:
        server = HealthServer(
            f"127.0.0.1:{free_port()}", liveness=lambda: (True, {}), readiness=lambda: (True, {})
        )
        await server.start()
        await server.stop()
        log = structlog.get_logger("test")
        thread = threading.Thread(
            target=lambda: log.warning(
                "lease_lost", msg="no longer hold lease x", deadline=wall_iso(boottime() + 5)
            )
        )
        thread.start()
        thread.join()
        log.info("an unconverted sentence")
    finally:
        structlog.reset_defaults()  # the captured stderr goes away with this test
    out = lines(capsys.readouterr().err)
    assert [o["event"] for o in out] == [
        "health_listening",
        "lease_lost",
        "an unconverted sentence",
    ]
    for o in out:
        assert list(o)[:4] == ["timestamp", "level", "event", "msg"], o
        assert o["msg"] and o["site"] == "site-a" and o["node"] == "n1", o
    assert out[0]["msg"].startswith("health endpoint listening on 127.0.0.1:")
    assert out[2]["msg"] == "an unconverted sentence"
    ahead = when(out[1]["deadline"]) - when(out[1]["timestamp"])
    assert timedelta(seconds=4) < ahead < timedelta(seconds=6)


APP = {
    "apiVersion": "harmony/v1",
    "kind": "Application",
    "metadata": {"name": "ledger"},
    "spec": {
        "trait": "stateful",
        "placement": {"sites": ["site-a"]},
        "score": {"kind": "Process", "command": ["sleep", "600"], "stop_timeout": "1s"},
    },
}


@pytest.fixture
async def agent(nats_server: NatsNode, tmp_path: Path) -> AsyncIterator[AgentProcess]:
    proc = AgentProcess(site="site-a", node="n1", workdir=tmp_path / "a", servers=[nats_server.url])
    proc.start()
    try:
        await eventually(proc.ready, timeout=30, what="agent ready")
        yield proc
    finally:
        proc.stop()


async def test_a_real_agents_log(agent: AgentProcess, nats_server: NatsNode) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(STATE_BUCKET)
        await kv.put(app_key("ledger"), Application.model_validate(APP).to_json())
        await eventually(
            lambda: '"event": "app_started"' in agent.log(1_000_000), timeout=30, what="started"
        )
        for body in (b"not json", b'{"app": "nope"}', b'{"app": "ledger", "extra": 1}'):
            reply = await nc.request(agent_cmd_subject("site-a", "n1", "fence"), body, timeout=5)
            assert not json.loads(reply.data)["ok"]
        reply = await nc.request(agent_cmd_subject("site-a", "n1", "ping"), b"{}", timeout=5)
        assert json.loads(reply.data)["ok"]
    finally:
        await nc.close()
    assert agent.stop() == 0
    out = lines(agent.log(10_000_000))
    for o in out:
        assert {"event", "msg", "level", "timestamp", "site", "node"} <= set(o), o
        assert NAME.match(o["event"]) or o["event"] in NOT_CONVERTED, o["event"]
    events = [o["event"] for o in out]
    assert events.count("command_refused") == 3  # one line per refused command
    ping = [o for o in out if o["event"] == "command_served" and o.get("verb") == "ping"]
    assert [o["level"] for o in ping] == ["debug"]
    assert "session_opened" in events  # the session thread's lines carry site and node too

    acquired = next(o for o in out if o["event"] == "lease_acquired")
    started = next(o for o in out if o["event"] == "app_started")
    assert acquired["msg"] == f"acquired lease ledger with token {acquired['term']}"
    assert started["fencing_token"] == acquired["term"]
    for line in (acquired, started):  # deadlines: wall-clock UTC, within a ttl ahead
        ahead = when(line["deadline"]) - when(line["timestamp"])
        assert timedelta(0) < ahead <= timedelta(seconds=2), line
    stopping = next(o for o in out if o["event"] == "agent_stopping")
    assert when(stopping["deadline"]) > when(stopping["timestamp"])
