"""Per-application metrics of real agents (``harmony-agent run`` on a real nats-server),
read from their live ``/metrics``: series from an application's appearance (at 0) to its
deletion (gone), moves counted once by the agent that takes the lease, restarts and
give-ups, commands by verb and result, and the seconds left before the fence kills a
workload, checked against the real fence."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from agent.application import Application
from mesh.names import STATE_BUCKET, agent_cmd_subject, app_cmd_subject, app_key
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

TTL = 2.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def app_doc(name: str, sites: list[str], command: list[str], **score: Any) -> bytes:
    doc = {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": name},
        "spec": {
            "trait": "stateful",
            "placement": {"sites": sites},
            "score": {"kind": "Process", "command": command, "stop_timeout": "1s", **score},
        },
    }
    return Application.model_validate(doc).to_json()


def scrape(agent: AgentProcess) -> Samples:
    url = f"http://{agent.health_host}:{agent.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def app_value(agent: AgentProcess, samples: Samples, name: str, app: str) -> float | None:
    return value(samples, name, app=app, site=agent.site, node=agent.node)


async def until(agent: AgentProcess, name: str, app: str, want: float, what: str) -> Samples:
    def probe() -> Samples | None:
        samples = scrape(agent)
        return samples if app_value(agent, samples, name, app) == want else None

    return await eventually(probe, timeout=30, interval=0.1, what=f"{agent.agent_id}: {what}")


def workload_pid(agent: AgentProcess, app: str) -> int | None:
    """The workload's pid, from the agent's own record (``controller/instances.json``)."""
    path = agent.workdir / "state" / "controller" / "instances.json"
    try:
        pid = json.loads(path.read_text())["apps"][app]["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return pid if isinstance(pid, int) else None


@pytest.fixture
async def client(nats_server: NatsNode) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


@pytest.fixture
def spawn(nats_server: NatsNode, tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    async def start(site: str) -> AgentProcess:
        proc = AgentProcess(
            site=site, node="n1", workdir=tmp_path / site, servers=[nats_server.url], ttl="2s"
        )
        proc.start()
        started.append(proc)
        await eventually(proc.ready, timeout=30, what=f"{proc.agent_id} ready")
        return proc

    yield start
    for proc in started:
        proc.kill()


async def put_app(nc: Client, name: str, body: bytes) -> None:
    kv = await nc.jetstream().key_value(STATE_BUCKET)
    await kv.put(app_key(name), body)


async def command(nc: Client, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=10)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


async def test_series_start_at_zero_moves_are_counted_once_and_deletion_removes_them(
    client: Client, spawn: Any
) -> None:
    a = await spawn("site-a")
    b = await spawn("site-b")
    await put_app(client, "ledger", app_doc("ledger", ["site-a", "site-b"], ["sleep", "600"]))

    held = await until(a, "harmony_app_lease_held", "ledger", 1, "ledger held")
    await until(a, "harmony_app_running", "ledger", 1, "ledger running")
    assert 0 < (app_value(a, held, "harmony_app_lease_remaining_seconds", "ledger") or 0) <= TTL
    standby = await until(b, "harmony_app_running", "ledger", 0, "series of ledger at b")
    for name in (
        "harmony_app_running",
        "harmony_app_lease_held",
        "harmony_app_fencing_token",
        "harmony_app_failovers_total",
        "harmony_app_handovers_total",
        "harmony_app_restarts_total",
        "harmony_app_give_ups_total",
        "harmony_app_step_failures_total",
    ):
        assert app_value(b, standby, name, "ledger") == 0, name  # present, at 0
    assert app_value(b, standby, "harmony_app_lease_remaining_seconds", "ledger") is None
    assert value(standby, "harmony_app_state", app="ledger", site="site-b", node="n1",
                 state="standby") == 1  # fmt: skip

    # A planned failover to site-b: one handover, counted by b (the receiver) only.
    reply = await command(client, app_cmd_subject("ledger", "failover"), {"to": "site-b"})
    assert reply["ok"], reply
    moved = await until(b, "harmony_app_handovers_total", "ledger", 1, "handover counted")
    assert app_value(b, moved, "harmony_app_failovers_total", "ledger") == 0
    await until(b, "harmony_app_running", "ledger", 1, "ledger running at b")
    after = await until(a, "harmony_app_running", "ledger", 0, "ledger stopped at a")
    assert app_value(a, after, "harmony_app_handovers_total", "ledger") == 0
    ok = dict(site="site-a", node="n1", verb="failover", result="ok")
    assert value(after, "harmony_commands_total", **ok) == 1

    # b dies: a takes the lease over after its ttl; one failover, counted by a.
    b.kill()
    took = await until(a, "harmony_app_failovers_total", "ledger", 1, "failover counted")
    assert app_value(a, took, "harmony_app_handovers_total", "ledger") == 0
    await until(a, "harmony_app_running", "ledger", 1, "ledger running at a again")

    # A refused command is counted as an error under its verb.
    bad = await command(client, agent_cmd_subject("site-a", "n1", "fence"), {"app": "nope"})
    assert not bad["ok"]
    errors = scrape(a)
    err = dict(site="site-a", node="n1", verb="fence", result="error")
    assert value(errors, "harmony_commands_total", **err) == 1

    # Deleted: its series go away.
    kv = await client.jetstream().key_value(STATE_BUCKET)
    await kv.delete(app_key("ledger"))

    def gone() -> bool:
        return not any(dict(labels).get("app") == "ledger" for _, labels in scrape(a))

    await eventually(gone, timeout=30, interval=0.2, what="ledger's series removed")


async def test_restarts_and_give_ups(client: Client, spawn: Any) -> None:
    a = await spawn("site-a")
    crash = ["sh", "-c", "sleep 0.2; exit 3"]
    await put_app(client, "crashy", app_doc("crashy", ["site-a"], crash, backoff_initial="0.1s"))
    await until(a, "harmony_app_give_ups_total", "crashy", 1, "gave up after max failures")
    samples = await _failed(a, "crashy")
    restarts = app_value(a, samples, "harmony_app_restarts_total", "crashy")
    assert restarts is not None and restarts >= 2, restarts  # max_failures 3: 2 restarts at least


async def test_a_start_that_always_fails_is_given_up(client: Client, spawn: Any) -> None:
    """A missing binary fails every start (no crash to count, no restart of its own): the
    agent gives the application up after max failures so another site may try, instead of
    retrying under the lease for ever (each attempt used to reset the count)."""
    a = await spawn("site-a")
    await put_app(client, "broken", app_doc("broken", ["site-a"], ["/nonexistent/binary"]))
    await until(a, "harmony_app_give_ups_total", "broken", 1, "gave up on the start")
    await _failed(a, "broken")


async def _failed(a: Any, app: str) -> Samples:
    """The scrape in which ``app`` is in state failed on ``a``: the give-up count moves when
    the give-up is decided, the state once it is carried out."""
    state = dict(app=app, site="site-a", node="n1", state="failed")

    def failed() -> Samples | None:
        samples = scrape(a)
        return samples if value(samples, "harmony_app_state", **state) == 1 else None

    return await eventually(failed, timeout=30, what=f"{app} in state failed")


async def test_seconds_left_is_the_fence_deadline(
    client: Client, spawn: Any, nats_server: NatsNode
) -> None:
    """The seconds left never overstate the fence's deadline.

    With the mesh frozen (nats-server SIGSTOPped) no renewal lands and the fence kills the
    workload at its deadline. Every scrape started at ``t`` and reporting ``left`` claims
    the workload lives until at least ``t + left``; the instant we see it dead must not
    come before that. No tolerance is needed: the claim is a lower bound of what the
    metric computed, and the death we observe happened at or after the true deadline."""
    a = await spawn("site-a")
    await put_app(client, "ledger", app_doc("ledger", ["site-a"], ["sleep", "600"]))
    await until(a, "harmony_app_running", "ledger", 1, "ledger running")
    pid = await eventually(lambda: workload_pid(a, "ledger"), timeout=10, what="pid recorded")

    # Renewals move it: positive at scrapes over two ttls (a stale value would reach 0).
    seen: list[float] = []

    def moving() -> bool:
        left = app_value(a, scrape(a), "harmony_app_lease_remaining_seconds", "ledger")
        assert left is not None and 0 < left <= TTL, left
        seen.append(left)
        return len(seen) >= 2 * TTL / 0.2

    await eventually(moving, timeout=30, interval=0.2, what="renewed deadlines")

    assert nats_server.proc is not None
    os.kill(nats_server.proc.pid, signal.SIGSTOP)
    claims: list[tuple[float, float]] = []
    try:
        give_up = time.monotonic() + 10 * TTL
        while alive(pid):
            assert time.monotonic() < give_up, "the fence never killed the workload"
            started = time.monotonic()
            left = app_value(a, scrape(a), "harmony_app_lease_remaining_seconds", "ledger")
            if left is not None:
                claims.append((started, left))
            await asyncio.sleep(0.02)
        dead_at = time.monotonic()
    finally:
        os.kill(nats_server.proc.pid, signal.SIGCONT)
    assert claims, "no scrape while the lease ran out"
    assert max(left for _, left in claims) > 0
    late = [(round(dead_at - t, 3), left) for t, left in claims if t + left > dead_at]
    assert not late, f"(seconds before the death, seconds left claimed): {late}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False
