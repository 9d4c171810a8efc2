"""Lease scale on a 3-node loopback cluster: 30 agents holding 1,000 leases.

* Steady state: KV writes per second, counted from the last-sequence deltas of the
  ``KV_harmony-leases`` and ``KV_harmony-state`` streams over a window. Target <= 3 x
  agents / ttl (only the sessions are renewed; lease keys are not written while held).
* Mass failover: the agent holding 1/3 of the leases (a separate process) is killed with
  SIGKILL; every one of its leases must be held again by a standby within ttl + 1 s.

    .venv/bin/python bench/leases.py [--agents 30] [--leases 1000] [--ttl 5] [--window 2]

``--window`` is in ttls. Results: ``bench/results/leases.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from common import pct, quiet, save, table
from tests.mesh.holder_proc import holder_argv, kill9, read_events, spawn_holder

from mesh.names import LEASES_BUCKET, STATE_BUCKET
from tests.harness.nats import NatsCluster
from tests.mesh.lease_world import Contender


async def until(probe: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


async def last_seqs(js: Any) -> int:
    total = 0
    for bucket in (LEASES_BUCKET, STATE_BUCKET):
        info = await js.stream_info(f"KV_{bucket}")
        total += info.state.last_seq
    return int(total)


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cluster = NatsCluster(work / "cluster")
    await cluster.start()
    urls = cluster.urls
    n_victim = args.leases // 3
    victim_leases = [f"v{i}" for i in range(n_victim)]
    other_leases = [f"o{i}" for i in range(args.leases - n_victim)]
    others: list[Contender] = []
    proc = None
    try:
        events = work / "victim.jsonl"
        argv = holder_argv(
            [urls[0]],
            "victim",
            events,
            *("--ttl", str(args.ttl), "--margin", str(args.ttl / 10)),
            *(a for n in victim_leases for a in ("--lease", n)),
        )
        proc = spawn_holder(argv, work / "victim.log")
        await until(
            lambda: len(read_events(events, "acquired")) == n_victim, 60, "victim holds its third"
        )
        n_others = args.agents - 1
        for i in range(n_others):
            c = Contender(
                [urls[(i + 1) % 3]], f"a{i}", "n1", ttl=args.ttl, margin=args.ttl / 10, step=0.1
            )
            await c.start()
            others.append(c)
        for j, name in enumerate(other_leases):
            others[j % n_others].want([name], rank=0)
        for j, name in enumerate(victim_leases):
            others[j % n_others].want([name], rank=1)
            others[(j + 1) % n_others].want([name], rank=2)
        await until(
            lambda: sum(len(c.held()) for c in others) == len(other_leases), 60, "others hold"
        )
        nc = await nats.connect(servers=[urls[2]])
        js = nc.jetstream()
        await asyncio.sleep(args.ttl)  # settle: let every agent renew at least once
        window = args.window * args.ttl
        before, t0 = await last_seqs(js), time.monotonic()
        await asyncio.sleep(window)
        after, t1 = await last_seqs(js), time.monotonic()
        writes_per_s = (after - before) / (t1 - t0)
        budget = 3 * args.agents / args.ttl

        kill9(proc)
        killed = time.monotonic()
        await until(
            lambda: sum(len(c.held()) for c in others) == args.leases,
            3 * args.ttl + 30,
            "all victim leases moved",
        )
        took = [c.acquired_at[n] - killed for c in others for n in victim_leases if n in c.held()]
        held_by = [sum(1 for c in others if n in c.held()) for n in victim_leases]
        last_sent = max(e["sent"] for e in read_events(events, "renewed"))
        await nc.close()
    finally:
        if proc is not None and proc.poll() is None:
            kill9(proc)
        for c in others:
            await c.kill()
        cluster.stop()
    moved_all = max(took)
    return {
        "agents": args.agents,
        "leases": args.leases,
        "ttl": args.ttl,
        "window_s": t1 - t0,
        "writes_per_s": writes_per_s,
        "write_budget_per_s": budget,
        "writes_ok": writes_per_s <= budget,
        "victim_leases": n_victim,
        "killed_after_last_renewal": killed - last_sent,
        "moved_since_last_renewal": moved_all + killed - last_sent,
        "moved_p50": pct(took, 50),
        "moved_all": moved_all,
        "moved_ok": moved_all <= args.ttl + 1 and all(h == 1 for h in held_by),
        "exactly_one_holder": all(h == 1 for h in held_by),
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--agents", type=int, default=30)
    p.add_argument("--leases", type=int, default=1000)
    p.add_argument("--ttl", type=float, default=5.0)
    p.add_argument("--window", type=float, default=2.0)
    args = p.parse_args()
    quiet()
    with tempfile.TemporaryDirectory(prefix="bench-leases-") as tmp:
        r = await run(args, Path(tmp))
    print(
        table(
            ["agents", "leases", "ttl", "writes/s", "budget 3*agents/ttl", "ok"],
            [
                [
                    r["agents"],
                    r["leases"],
                    r["ttl"],
                    r["writes_per_s"],
                    r["write_budget_per_s"],
                    "yes" if r["writes_ok"] else "NO",
                ]
            ],
        )
    )
    print()
    print(
        table(
            ["killed agent's leases", "moved p50 (s)", "all moved (s)", "target ttl+1", "ok"],
            [
                [
                    r["victim_leases"],
                    r["moved_p50"],
                    r["moved_all"],
                    r["ttl"] + 1,
                    "yes" if r["moved_ok"] else "NO",
                ]
            ],
        )
    )
    print(f"\nwrote {save('leases', {'scale': r, 'params': vars(args)})}")


if __name__ == "__main__":
    asyncio.run(main())
