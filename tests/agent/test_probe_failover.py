"""Issue 14: a failing health probe moves the application, and the site that gave it up does
not take it back while its probe still fails, even when it is the only site left.

Real agents on a real 3-node cluster, the ticker workload and its shared history (so any
overlap shows), and an exec probe that fails on a site while a file named after the site
exists (probes run with the workload's ``HARMONY_*`` environment).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from mesh.names import STATE_BUCKET, instance_key
from tests.harness import history
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually

TTL = 2.0
PERIOD, THRESHOLD = 0.2, 2
TICKER = Path(__file__).resolve().parents[1] / "workloads" / "ticker.py"
SLACK_NS = 150_000_000
"""Ticks are 10 ms apart: an instance that ticked within this runs now."""


def application(history_file: Path, sick_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": "ledger"},
        "spec": {
            "trait": "stateful",
            "failover": {"strategy": "AbsoluteConsistency"},
            "placement": {"sites": ["site-a", "site-b"]},
            "health": {
                "probe": {"exec": ["sh", "-c", f'test ! -e "{sick_dir}/sick.$HARMONY_SITE"']},
                "period": f"{int(PERIOD * 1000)}ms",
                "timeout": f"{int(PERIOD * 1000)}ms",
                "failure_threshold": THRESHOLD,
                "start_period": "0s",
                "cooldown": "1h",
            },
            "score": {
                "kind": "Process",
                "command": [sys.executable, str(TICKER), str(history_file)],
                "stop_timeout": "1s",
                "backoff_initial": "200ms",
            },
        },
    }


@pytest.fixture
async def client(mesh_client: Client) -> Client:
    return mesh_client


@pytest.fixture
def agents(tmp_path: Path, nats_cluster: NatsCluster) -> Iterator[dict[str, AgentProcess]]:
    procs = {
        f"site-{s}": AgentProcess(
            site=f"site-{s}",
            node="n1",
            workdir=tmp_path / f"agent-{s}",
            servers=[nats_cluster.urls[i]],
            ttl=f"{TTL}s",
            extra={"mesh": {"stores": nats_cluster.stores}},
        )
        for i, s in enumerate("ab")
    }
    yield procs
    for p in procs.values():
        p.kill()


def running_now(history_file: Path) -> list[history.Instance]:
    now = time.monotonic_ns()
    insts = history.instances(history.load(history_file), "ledger")
    return [i for i in insts if now - i.last_ns < SLACK_NS]


async def test_a_failing_probe_moves_the_app_and_it_stays_away_while_it_fails(
    client: Client, agents: dict[str, AgentProcess], tmp_path: Path
) -> None:
    hist = tmp_path / "history.txt"
    hist.touch(mode=0o666)
    sick = tmp_path / "sick"
    sick.mkdir()
    for agent in agents.values():
        agent.start()
    for agent in agents.values():
        await eventually(agent.ready, timeout=60, what=f"{agent.agent_id} ready")
    kv = await client.jetstream(timeout=5).key_value(STATE_BUCKET)
    await kv.put("app.ledger", json.dumps(application(hist, sick)).encode())

    def one(not_site: str | None = None) -> history.Instance | None:
        now = running_now(hist)
        return now[0] if len(now) == 1 and now[0].site != not_site else None

    first = await eventually(one, timeout=30, what="ledger running")

    def healthy_for_a_while() -> bool:  # its probe passes: it must not be given up
        now = one()
        assert now is not None and now.key == first.key, "given up with a passing probe"
        return now.last_ns - now.first_ns > 4 * THRESHOLD * PERIOD * 1e9

    await eventually(healthy_for_a_while, timeout=10, what="ledger running with a passing probe")
    (sick / f"sick.{first.site}").touch()  # alive, but its probe fails from now on
    failing_at = time.monotonic_ns()
    second = await eventually(
        lambda: one(not_site=first.site), timeout=30, what="ledger moved off the sick site"
    )
    moved = (second.first_ns - failing_at) / 1e9
    print(f"moved {moved:.2f}s after the probe started failing")
    assert second.token > first.token

    # The only other site goes away: the sick site must still not take it back.
    other = agents[second.site]
    other.kill()
    killed_at = time.monotonic_ns()
    giver = agents[first.site]

    async def cooling_down() -> bool:
        entry = await kv.get(instance_key("ledger", giver.site, giver.node))
        return json.loads(entry.value or b"{}").get("state") in ("failed", "standby")

    await eventually(cooling_down, timeout=10, what=f"{first.site} reports it gave up")
    await eventually(  # the dead holder's lease is free after a ttl: give it three
        lambda: time.monotonic_ns() - killed_at > 3 * TTL * 1e9,
        timeout=5 * TTL,
        interval=0.2,
        what="three ttls after the other site died",
    )
    insts = history.instances(history.load(hist), "ledger")
    back = [i for i in insts if i.site == first.site and i.first_ns > failing_at]
    assert back == [], "the sick site took the application back:\n" + history.describe(insts)

    (sick / f"sick.{first.site}").unlink()  # its probe passes again: the cooldown ends
    third = await eventually(one, timeout=30, what="ledger back on the healed site")
    assert third.site == first.site and third.token > second.token
    assert not history.overlaps(history.instances(history.load(hist), "ledger"))
