"""Lease scale on a 3-node loopback cluster: 30 agents holding 1,000 leases in 3 stores.

Every agent (a ``Contender``: session thread + ``LeaseManager``, the agent's lease engine)
has one session record per store, renewed every ttl/3; leases are bound to the session and
never written while held. So the steady-state write rate must be O(agents), whatever the
number of leases:

* ``writes``: the last-sequence deltas of every lease store stream (``KV_harmony-leases-*``)
  over a window, measured twice: with 10 % of the leases held, then with all of them. The
  expected rate is ``3 x agents x stores / ttl`` (the renewals); the budget is 1.5 times
  that. One write per lease per ttl would be 1,000 x stores / ttl on top, far above it. The
  script exits 1 when a window exceeds the budget or the rate grows with the leases.
* ``failover``: one agent, a separate process holding a third of the leases, is killed
  with SIGKILL; every one of its leases must be held again, by exactly one standby, within
  ttl + 1 s of the kill (exit 1 otherwise). "since renewal" (acquisition - the victim's last
  renewal that landed) must be >= ttl: the safety rule, measured.

    .venv/bin/python bench/leases.py [--agents 30] [--leases 1000] [--ttl 5] [--window 2]

``--window`` is in ttls. Results: ``bench/results/leases.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats

from bench.common import pct, quiet, save, table
from mesh.clock import boottime
from mesh.names import store_stream
from tests.harness.nats import NatsCluster
from tests.mesh.lease_world import Contender, make_mesh

HOLDER = Path(__file__).with_name("lease_holder.py")
BUDGET_FACTOR = 1.5


async def until(probe: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


def read_events(path: Path, ev: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed writer
        if item.get("ev") == ev:
            out.append(item)
    return out


async def total_seq(js: Any, stores: list[str]) -> int:
    total = 0
    for store in stores:
        info = await js.stream_info(store_stream(store))
        total += info.state.last_seq
    return int(total)


async def write_rate(js: Any, stores: list[str], seconds: float) -> float:
    before, t0 = await total_seq(js, stores), time.monotonic()
    await asyncio.sleep(seconds)
    after, t1 = await total_seq(js, stores), time.monotonic()
    return (after - before) / (t1 - t0)


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cluster = NatsCluster(work / "cluster")
    await cluster.start()
    urls, stores = cluster.urls, cluster.stores
    await make_mesh(urls, stores)
    margin = args.ttl / 10
    n_victim = args.leases // 3
    victim_leases = [f"v{i}" for i in range(n_victim)]
    other_leases = [f"o{i}" for i in range(args.leases - n_victim)]
    others: list[Contender] = []
    proc: subprocess.Popen[bytes] | None = None
    events = work / "victim.jsonl"
    nc = await nats.connect(servers=[urls[2]])
    js = nc.jetstream()
    try:
        n_others = args.agents - 1
        for i in range(n_others):
            c = Contender(
                [urls[(i + 1) % 3]], stores, f"a{i}", "n1", ttl=args.ttl, margin=margin, step=0.1
            )
            await c.start()
            others.append(c)
        # 10 % of the leases first: the write rate must not move when the rest arrive.
        few = other_leases[: args.leases // 10]
        for j, name in enumerate(few):
            others[j % n_others].want([name], rank=0)
        await until(lambda: sum(len(c.held()) for c in others) == len(few), 120, "few held")
        await asyncio.sleep(args.ttl)  # settle: every agent renewed at least once
        window = args.window * args.ttl
        rate_few = await write_rate(js, stores, window)

        (work / "victim.leases").write_text("\n".join(victim_leases))
        log = open(work / "victim.log", "wb")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [
                sys.executable,
                str(HOLDER),
                *(a for u in urls[:1] for a in ("--url", u)),
                *("--stores", ",".join(stores), "--site", "victim", "--ttl", str(args.ttl)),
                *("--margin", str(margin), "--events", str(events)),
                *("--leases-file", str(work / "victim.leases")),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        await until(
            lambda: len(read_events(events, "acquired")) == n_victim, 120, "victim holds its third"
        )
        for j, name in enumerate(other_leases[len(few) :], start=len(few)):
            others[j % n_others].want([name], rank=0)
        for j, name in enumerate(victim_leases):
            others[j % n_others].want([name], rank=1)
            others[(j + 1) % n_others].want([name], rank=2)
        await until(
            lambda: sum(len(c.held()) for c in others) == len(other_leases), 120, "others hold"
        )
        await asyncio.sleep(args.ttl)
        rate_all = await write_rate(js, stores, window)

        os.killpg(proc.pid, signal.SIGKILL)
        killed = boottime()
        proc.wait()
        await until(
            lambda: sum(len(c.held()) for c in others) == args.leases,
            3 * args.ttl + 60,
            "all victim leases moved",
        )
        took = [c.acquired_at[n] - killed for c in others for n in victim_leases if n in c.held()]
        held_by = [sum(1 for c in others if n in c.held()) for n in victim_leases]
        last_sent = max(e["sent"] for e in read_events(events, "renewed"))
        first_taken = min(c.acquired_at[n] for c in others for n in victim_leases if n in c.held())
    finally:
        await nc.close()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for c in others:
            await c.kill()
        cluster.stop()
    expected = 3 * args.agents * len(stores) / args.ttl
    budget = BUDGET_FACTOR * expected
    moved_all = max(took)
    return {
        "agents": args.agents,
        "leases": args.leases,
        "stores": len(stores),
        "ttl": args.ttl,
        "window_s": window,
        "writes_per_s_few": round(rate_few, 2),
        "leases_few": len(few),
        "writes_per_s_all": round(rate_all, 2),
        "renewals_expected_per_s": round(expected, 2),
        "write_budget_per_s": round(budget, 2),
        "writes_ok": rate_all <= budget and rate_few <= budget,
        "grows_with_leases": rate_all > 1.2 * rate_few + 2,
        "victim_leases": n_victim,
        "killed_after_last_renewal": round(killed - last_sent, 3),
        "min_since_renewal": round(first_taken - last_sent, 3),
        "moved_p50": round(pct(took, 50), 3),
        "moved_all": round(moved_all, 3),
        "exactly_one_holder": all(h == 1 for h in held_by),
        "moved_ok": moved_all <= args.ttl + 1
        and all(h == 1 for h in held_by)
        and first_taken - last_sent >= args.ttl,
    }


async def main() -> int:
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
            ["agents", "leases held", "stores", "ttl", "writes/s", "renewals 3*a*s/ttl", "budget"],
            [
                [
                    a,
                    n,
                    r["stores"],
                    r["ttl"],
                    w,
                    r["renewals_expected_per_s"],
                    r["write_budget_per_s"],
                ]
                for a, n, w in (
                    (r["agents"], r["leases_few"], r["writes_per_s_few"]),
                    (r["agents"], r["leases"], r["writes_per_s_all"]),
                )
            ],
        )
    )
    print()
    print(
        table(
            [
                "killed agent's leases",
                "moved p50 (s)",
                "all moved (s)",
                "target ttl+1",
                "min since renewal (s)",
                "one holder each",
                "ok",
            ],
            [
                [
                    r["victim_leases"],
                    r["moved_p50"],
                    r["moved_all"],
                    r["ttl"] + 1,
                    r["min_since_renewal"],
                    "yes" if r["exactly_one_holder"] else "NO",
                    "yes" if r["moved_ok"] else "NO",
                ]
            ],
        )
    )
    print(f"\nwrote {save('leases', {'scale': r, 'params': vars(args)})}")
    failed = []
    if not r["writes_ok"]:
        failed.append(
            f"writes {r['writes_per_s_all']}/s (with {r['leases_few']} leases: "
            f"{r['writes_per_s_few']}/s) exceed the budget {r['write_budget_per_s']}/s"
        )
    if r["grows_with_leases"]:
        failed.append(
            f"writes grow with the leases: {r['writes_per_s_few']}/s -> {r['writes_per_s_all']}/s"
        )
    if not r["moved_ok"]:
        failed.append("mass failover missed ttl + 1 s, one holder each, or since renewal >= ttl")
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
