"""Health-driven failover (issue 14): how long after a workload's probe starts failing is the
application running on another site?

Three real agents (site-a, site-b, site-c) on a 3-node loopback JetStream cluster, one
AbsoluteConsistency Process application (the ticker workload of the tests, which writes its
own start and every 10 ms tick into a shared history) placed on all three sites, and an exec
probe that fails on a site while a file named after that site exists. Each run makes the
current holder's probe fail (touches its file) and measures, on CLOCK_MONOTONIC:

* ``moved``: file touched -> first tick of the new instance on another site;
* ``gap``: last tick of the sick instance -> first tick of the new one (the time without
  the application);
* ``overlaps``: two instances ticking at once (must be 0).

Target (issue 14): ``moved`` <= period x failure_threshold + ttl + 2 s. The sick site's file
is removed once the application has moved; the site's cool-down is as short as the rules
allow, so a later run can move the application back there.

    .venv/bin/python bench/probe_failover.py [--runs 10] [--ttl 2] [--period 1] [--threshold 3]

Results: ``bench/results/probe_failover.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats

from bench.common import pct, quiet, save, table
from mesh.names import STATE_BUCKET
from tests.harness import history
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually
from tests.mesh.lease_world import make_mesh

SITES = ("site-a", "site-b", "site-c")
TICKER = Path(__file__).resolve().parents[1] / "tests" / "workloads" / "ticker.py"
SLACK_NS = 150_000_000
"""Ticks are 10 ms apart: an instance that ticked within this runs now."""


def application(hist: Path, sick: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": "ledger"},
        "spec": {
            "trait": "stateful",
            "failover": {"strategy": "AbsoluteConsistency"},
            "placement": {"sites": list(SITES)},
            "health": {
                "probe": {"exec": ["sh", "-c", f'test ! -e "{sick}/sick.$HARMONY_SITE"']},
                "period": f"{args.period}s",
                "timeout": f"{args.period}s",
                "failure_threshold": args.threshold,
                "start_period": "0s",
                # As short as the rules allow (>= ttl and >= period x threshold): the
                # site that gave up may take the application back a few runs later.
                "cooldown": f"{args.period * args.threshold + args.ttl}s",
            },
            "score": {
                "kind": "Process",
                "command": [sys.executable, str(TICKER), str(hist)],
                "stop_timeout": "1s",
            },
        },
    }


def running_now(hist: Path) -> list[history.Instance]:
    now = time.monotonic_ns()
    insts = history.instances(history.load(hist), "ledger")
    return [i for i in insts if now - i.last_ns < SLACK_NS]


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cluster = NatsCluster(work / "cluster")
    await cluster.start()
    agents: list[AgentProcess] = []
    rows: list[dict[str, Any]] = []
    try:
        await make_mesh(cluster.urls, cluster.stores)  # waits out the meta-leader election
        for i, site in enumerate(SITES):
            agent = AgentProcess(
                site=site,
                node="n1",
                workdir=work / site,
                servers=[cluster.urls[i]],
                ttl=f"{args.ttl}s",
                extra={"mesh": {"stores": cluster.stores}},
            )
            agent.start()
            agents.append(agent)
        for agent in agents:
            await eventually(agent.ready, timeout=60, what=f"{agent.agent_id} ready")
        hist, sick = work / "history.txt", work / "sick"
        hist.touch(mode=0o666)
        sick.mkdir()
        nc = await nats.connect(servers=cluster.urls)
        kv = await nc.jetstream(timeout=5).key_value(STATE_BUCKET)
        await kv.put("app.ledger", json.dumps(application(hist, sick, args)).encode())
        await nc.close()

        def one(not_site: str | None = None) -> history.Instance | None:
            now = running_now(hist)
            return now[0] if len(now) == 1 and now[0].site != not_site else None

        for n in range(args.runs):
            first = await eventually(one, timeout=60, what="ledger running once")
            assert first is not None
            await asyncio.sleep(args.period * (args.threshold + 1))  # a healthy stretch
            flag = sick / f"sick.{first.site}"
            flag.touch()
            failing_at = time.monotonic_ns()
            second = await eventually(
                lambda first=first: one(not_site=first.site),
                timeout=60,
                interval=0.01,
                what="ledger moved off the sick site",
            )
            assert second is not None
            flag.unlink()
            insts = history.instances(history.load(hist), "ledger")
            old = next(i for i in insts if i.key == first.key)
            row = {
                "from": first.site,
                "to": second.site,
                "moved": round((second.first_ns - failing_at) / 1e9, 3),
                "gap": round((second.first_ns - old.last_ns) / 1e9, 3),
                "overlaps": len(history.overlaps(insts)),
            }
            rows.append(row)
            print(f"  run {n + 1}: {json.dumps(row)}", flush=True)
    finally:
        for agent in agents:
            agent.kill()
        for node in cluster.nodes:
            node.kill()
    return {"rows": rows}


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--ttl", type=float, default=2.0)
    p.add_argument("--period", type=float, default=1.0)
    p.add_argument("--threshold", type=int, default=3)
    args = p.parse_args()
    quiet()
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        r = await run(args, Path(tmp))
    moved = [row["moved"] for row in r["rows"]]
    gaps = [row["gap"] for row in r["rows"]]
    overlaps = sum(row["overlaps"] for row in r["rows"])
    target = args.period * args.threshold + args.ttl + 2
    ok = bool(moved) and max(moved) <= target and overlaps == 0
    summary = {
        "runs": len(moved),
        "moved_p50": pct(moved, 50),
        "moved_max": max(moved, default=float("nan")),
        "gap_p50": pct(gaps, 50),
        "gap_max": max(gaps, default=float("nan")),
        "overlaps": overlaps,
        "target_s": target,
        "met": ok,
    }
    print()
    print(
        table(
            [
                "ttl",
                "period",
                "threshold",
                "runs",
                "moved p50",
                "moved max",
                "gap p50",
                "gap max",
                "overlaps",
                "target",
                "met",
            ],
            [
                [
                    args.ttl,
                    args.period,
                    args.threshold,
                    summary["runs"],
                    summary["moved_p50"],
                    summary["moved_max"],
                    summary["gap_p50"],
                    summary["gap_max"],
                    overlaps,
                    target,
                    "yes" if ok else "no",
                ]
            ],
        )
    )
    save("probe_failover", {"params": vars(args), "summary": summary, "rows": r["rows"]})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
