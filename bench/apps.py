"""A thousand applications (issue 17): start, idle cost, failover, status, renewal size.

Three sites on loopback (one nats-server and one agent each, a 3-node JetStream cluster
with one lease store per site), N stateful AbsoluteConsistency Process applications
(``sleep 100000.<i>``: a workload that costs nothing, told apart by its argument), placed
on all three sites (application i prefers site i mod 3), applied with one
``harmony-agent apply -f``. Every workload's life comes from the kernel (exec and exit
events of the proc connector, ``tests/harness/procevents.py``), so overlaps are checked
over the whole history, not sampled. Measured per ttl:

* ``start``: from the moment ``apply`` is run to every application running exactly once;
* ``session losses``: ``session_lapsed`` / ``session_store_lost`` events in the agents'
  JSON logs from the apply to the end of the idle window (must be 0), and ``lease
  losses``: ``lease_lost`` events (a lease dropped by its holder; must be 0 too);
* ``idle``: CPU (% of one core) and RSS of each agent plus its fence over ``--idle``
  seconds, from /proc, starting ``max(SETTLE_S, 2 ttl)`` after every application runs
  (the workloads excluded; the nats-servers shown apart);
* ``status``: wall time of ``harmony-agent status -o json`` (a new CLI process) with N
  applications;
* ``renewal``: the session renewal messages (payload and headers, captured on their
  subjects) at 10 applications and at N, and the renewal writes per second per agent;
* ``failover``: SIGKILL the agent running the most applications -> every one of them
  running elsewhere (kill to the last new exec), and no application ever ran twice.

Targets: all running within 60 s at ttl 2 s and 10 s with 0 session losses; idle <= 5 %
of one core and <= 150 MB per agent (agent + fence); failover within ttl + 2 s, 0
overlaps; status < 1 s; renewal size independent of N. The script exits 1 when one is
missed (``--no-check`` to only report).

    .venv/bin/python bench/apps.py [--apps 1000] [--ttl 2,10] [--idle 30]

Needs root (the proc connector). Results: ``bench/results/apps.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import yaml

from bench.common import save, table
from tests.harness import history
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.ports import free_port
from tests.harness.procevents import ProcHistory, available
from tests.harness.wait import eventually

SITES = ("site-a", "site-b", "site-c")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
WORKLOAD = rb"sleep\x00100000\.(\d+)\x00"
SESSION_LOSSES = ('"event": "session_lapsed"', '"event": "session_store_lost"')
"""The session thread's own lines: the session (not one lease) lapsed or lost a store."""
LEASE_LOSSES = ('"event": "lease_lost"',)
"""Any held lease lost (its deadline ran out, or its claim was overwritten)."""
SETTLE_S = 15.0
"""Seconds between every application running and the start of the idle window."""
RENEWALS = "$KV.*.sess.*.*.live"
"""Renewals in every lease store (filtered to ``$KV.harmony-leases-...``)."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 1e6


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def fence_of(agent_pid: int) -> int | None:
    for child in children(agent_pid):
        with contextlib.suppress(OSError):
            if b"fence.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
    return None


def apps_yaml(n: int) -> str:
    docs = [
        {
            "apiVersion": "harmony/v1",
            "kind": "Application",
            "metadata": {"name": f"app-{i:04d}"},
            "spec": {
                "trait": "stateful",
                "placement": {"sites": [SITES[(i + k) % 3] for k in range(3)]},
                "score": {
                    "kind": "Process",
                    "command": ["sleep", f"100000.{i}"],
                    "stop_timeout": "1s",
                },
            },
        }
        for i in range(n)
    ]
    return yaml.safe_dump_all(docs)


def header_bytes(headers: dict[str, str] | None) -> int:
    """Wire size of a NATS header block (``NATS/1.0`` line, ``k: v`` lines, blank line)."""
    if not headers:
        return 0
    return 10 + sum(len(k) + 2 + len(v) + 2 for k, v in headers.items()) + 2


class World:
    """Three nats-servers (one cluster) and three agents on loopback."""

    def __init__(self, workdir: Path, ttl: float) -> None:
        self.workdir = workdir
        self.ttl = ttl
        cports = [free_port() for _ in SITES]
        self.nodes = [
            NatsNode(
                name=f"n-{site}",
                workdir=workdir / site / "nats",
                cluster_port=cports[i],
                routes=tuple(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(cports) if j != i),
                tags=(f"site:{site}",),
            )
            for i, site in enumerate(SITES)
        ]
        self.agents: list[AgentProcess] = []
        self.procs = ProcHistory(WORKLOAD)
        self.renewals: list[tuple[float, str, int, int]] = []
        """(time, subject, payload bytes, header bytes) of every renewal seen."""
        self._nc: Any = None
        self.victim: AgentProcess | None = None
        """The agent the failover kills (its death is expected)."""

    async def start(self) -> None:
        self.procs.start()
        for node in self.nodes:
            node.start()
        await asyncio.gather(*(n.wait_ready(30) for n in self.nodes))
        for i, site in enumerate(SITES):
            agent = AgentProcess(
                site=site,
                node="n1",
                workdir=self.workdir / site / "agent",
                servers=[self.nodes[i].url],
                ttl=f"{self.ttl:g}s",
                extra={"mesh": {"stores": list(SITES)}, "log": {"level": "info"}},
            )
            agent.start()
            self.agents.append(agent)
        for agent in self.agents:
            await eventually(agent.ready, timeout=90, what=f"{agent.agent_id} ready")
        self._nc = await nats.connect(self.nodes[0].url)

        async def seen(msg: Any) -> None:
            if not msg.subject.startswith("$KV.harmony-leases-"):
                return
            self.renewals.append(
                (time.monotonic(), msg.subject, len(msg.data), header_bytes(msg.headers))
            )

        await self._nc.subscribe(RENEWALS, cb=seen)

    async def stop(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        for agent in self.agents:
            agent.kill()  # the fences see their agent die and stop every workload
        with contextlib.suppress(AssertionError):
            await eventually(lambda: not self.procs.running(), timeout=30, what="workloads gone")
        for pids in self.procs.running().values():
            for pid in pids:  # leftovers of ours only, by pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            node.stop()
        self.procs.stop()

    def cli(self, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args, "-s", self.nodes[0].url, "--timeout", "30s"],
            capture_output=True,
            text=True,
            check=False,
        )
        return time.monotonic() - started, done

    def dead(self, *, spare: AgentProcess | None = None) -> list[str]:
        """Agents that exited on their own (with the last line of their log)."""
        return [
            f"{a.agent_id} exited: {a.log(600).strip().splitlines()[-1:]}"
            for a in self.agents
            if a is not spare and not a.running()
        ]

    def count(self, lines: tuple[str, ...]) -> int:
        return sum(a.log(1 << 30).count(p) for a in self.agents for p in lines)

    def renewal_sample(self, since: float) -> dict[str, Any]:
        seen = [r for r in self.renewals if r[0] >= since]
        span = (seen[-1][0] - seen[0][0]) if len(seen) > 1 else 0.0
        return {
            "messages": len(seen),
            "payload_bytes_max": max((r[2] for r in seen), default=0),
            "header_bytes_max": max((r[3] for r in seen), default=0),
            "writes_per_s_per_agent": round(len(seen) / span / len(self.agents), 2)
            if span
            else None,
        }


async def until_all_running(
    world: World, n: int, timeout: float, replaced: dict[str, set[int]] | None = None
) -> float | None:
    """Seconds until every application runs exactly once (those in ``replaced`` as a new
    process); None on timeout."""
    started = time.monotonic()
    moved = replaced or {}
    while time.monotonic() - started < timeout:
        if world.dead(spare=world.victim):
            raise RuntimeError("; ".join(world.dead(spare=world.victim)))
        running = world.procs.running()
        ok = len(running) == n and all(len(p) == 1 for p in running.values())
        if ok and all(not (set(running[a]) & pids) for a, pids in moved.items()):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def idle_cost(world: World, seconds: float) -> dict[str, Any]:
    rows = []
    samples = {}
    for agent in world.agents:
        assert agent.proc is not None
        pid = agent.proc.pid
        fence = fence_of(pid)
        pids = [pid] + ([fence] if fence else [])
        samples[agent.agent_id] = (pids, sum(cpu_seconds(p) for p in pids))
    servers = [n.proc.pid for n in world.nodes if n.proc is not None]
    server_before = sum(cpu_seconds(p) for p in servers)
    await asyncio.sleep(seconds)
    for agent in world.agents:
        pids, before = samples[agent.agent_id]
        used = sum(cpu_seconds(p) for p in pids) - before
        rows.append(
            {
                "agent": agent.agent_id,
                "workloads": sum(len(children(p)) for p in pids[1:]),
                "cpu_pct": round(100 * used / seconds, 2),
                "rss_mb": round(sum(rss_mb(p) for p in pids), 1),
                "agent_rss_mb": round(rss_mb(pids[0]), 1),
            }
        )
    server_pct = 100 * (sum(cpu_seconds(p) for p in servers) - server_before) / seconds / 3
    return {"agents": rows, "nats_server_cpu_pct_each": round(server_pct, 2)}


async def renewal_at_10(ttl: float) -> dict[str, Any]:
    """The renewal messages of a mesh running 10 applications (compared with N)."""
    with tempfile.TemporaryDirectory(prefix="bench-apps10-") as tmp:
        world = World(Path(tmp), ttl)
        try:
            await world.start()
            path = Path(tmp) / "apps.yaml"
            path.write_text(apps_yaml(10))
            _, done = world.cli("apply", "-f", str(path))
            assert done.returncode == 0, done.stderr
            assert await until_all_running(world, 10, 60) is not None, "10 apps not running"
            since = time.monotonic()
            await asyncio.sleep(2 * ttl)
            return world.renewal_sample(since)
        finally:
            await world.stop()


async def one_ttl(n: int, ttl: float, idle: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-apps-") as tmp:
        world = World(Path(tmp), ttl)
        try:
            await world.start()
            path = Path(tmp) / "apps.yaml"
            path.write_text(apps_yaml(n))
            losses_before = world.count(SESSION_LOSSES), world.count(LEASE_LOSSES)
            t0 = time.monotonic()
            apply_s, done = world.cli("apply", "-f", str(path))
            assert done.returncode == 0, done.stderr
            took = await until_all_running(world, n, 180 - apply_s)
            start = {
                "seconds": round(apply_s + took, 3) if took is not None else None,
                "apply_cli_s": round(apply_s, 3),
                "running": len(world.procs.running()),
                "t_all_running": time.monotonic() - t0,
            }
            print(f"  ttl {ttl:g}: start {json.dumps(start)}", flush=True)
            # Settle first: right after the last start the agents still write what a start
            # storm leaves behind (instance reports, the lease view, events) for a few
            # seconds; the idle cost is the steady state after it.
            settle = max(SETTLE_S, 2 * ttl)
            await asyncio.sleep(settle)
            since = time.monotonic()
            idle_res = await idle_cost(world, idle)
            idle_res["settled_s"] = settle
            renewal = world.renewal_sample(since)
            start["session_losses"] = world.count(SESSION_LOSSES) - losses_before[0]
            start["lease_losses"] = world.count(LEASE_LOSSES) - losses_before[1]
            print(f"  ttl {ttl:g}: idle {json.dumps(idle_res)}", flush=True)
            print(f"  ttl {ttl:g}: renewal {json.dumps(renewal)}", flush=True)
            status_s, status = world.cli("status", "-o", "json")
            assert status.returncode == 0, status.stderr
            status_apps = len(json.loads(status.stdout)["applications"])
            # Failover: the agent whose fence runs the most workloads dies.
            counts = {}
            for a in world.agents:
                assert a.proc is not None
                counts[a.agent_id] = len(children(fence_of(a.proc.pid) or 0))
            victim = world.victim = max(world.agents, key=lambda a: counts[a.agent_id])
            assert victim.proc is not None
            mine = set(children(fence_of(victim.proc.pid) or 0))
            replaced = {a: set(p) for a, p in world.procs.running().items() if set(p) & mine}
            killed_ns = time.monotonic_ns()
            os.kill(victim.proc.pid, signal.SIGKILL)
            moved_s = await until_all_running(world, n, 60 + ttl, replaced)
            insts = world.procs.instances()
            new_starts = [i.first_ns for i in insts if i.app in replaced and i.first_ns > killed_ns]
            failover = {
                "apps": len(replaced),
                "all_running_s": round(moved_s, 3) if moved_s is not None else None,
                "last_exec_s": round((max(new_starts) - killed_ns) / 1e9, 3)
                if new_starts
                else None,
                "first_exec_s": round((min(new_starts) - killed_ns) / 1e9, 3)
                if new_starts
                else None,
            }
            overlaps = history.overlaps(insts)
            print(f"  ttl {ttl:g}: failover {json.dumps(failover)}", flush=True)
            return {
                "ttl": ttl,
                "apps": n,
                "start": start,
                "idle": idle_res,
                "renewal": renewal,
                "status_json_s": round(status_s, 3),
                "status_apps": status_apps,
                "failover": failover,
                "instances": len(insts),
                "overlaps": [str(o) for o in overlaps[:10]],
                "overlap_count": len(overlaps),
                "events_dropped": world.procs.dropped,
            }
        finally:
            await world.stop()


def verdicts(r: dict[str, Any]) -> dict[str, bool]:
    ttl = r["ttl"]
    agents = r["idle"]["agents"]
    fo = r["failover"]
    return {
        "all running <= 60 s": r["start"]["seconds"] is not None and r["start"]["seconds"] <= 60,
        "0 session losses": r["start"]["session_losses"] == 0,
        "0 lease losses": r["start"]["lease_losses"] == 0,
        "idle cpu <= 5 %": max(a["cpu_pct"] for a in agents) <= 5.0,
        "rss <= 150 MB": max(a["rss_mb"] for a in agents) <= 150.0,
        "failover <= ttl + 2 s": fo["last_exec_s"] is not None and fo["last_exec_s"] <= ttl + 2,
        "0 overlaps": r["overlap_count"] == 0 and r["events_dropped"] == 0,
        "status < 1 s": r["status_json_s"] < 1.0,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--ttl", default="2,10")
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--no-check", action="store_true", help="report, never exit 1")
    args = parser.parse_args()
    if not available():
        print("bench/apps.py needs root and the kernel's proc connector", file=sys.stderr)
        return 2
    ttls = [float(t) for t in args.ttl.split(",") if t]
    results = []
    small = await renewal_at_10(ttls[0])
    print(f"10 applications: renewal {json.dumps(small)}", flush=True)
    for ttl in ttls:
        print(f"{args.apps} applications, ttl {ttl:g}s", flush=True)
        load_before = os.getloadavg()
        results.append(await one_ttl(args.apps, ttl, args.idle))
        results[-1]["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    rows = []
    failed: list[str] = []
    for r in results:
        agents = r["idle"]["agents"]
        checks = verdicts(r)
        failed += [f"ttl {r['ttl']:g}: {k}" for k, ok in checks.items() if not ok]
        rows.append(
            [
                f"{r['ttl']:g}",
                r["apps"],
                r["start"]["seconds"],
                r["start"]["session_losses"],
                r["start"]["lease_losses"],
                max(a["cpu_pct"] for a in agents),
                max(a["rss_mb"] for a in agents),
                r["failover"]["apps"],
                r["failover"]["last_exec_s"],
                r["overlap_count"],
                r["status_json_s"],
                "yes" if all(checks.values()) else "NO",
            ]
        )
    headers = [
        "ttl", "apps", "all running s", "session losses", "lease losses", "idle cpu % (max agent)",
        "rss MB (agent+fence)", "failover apps", "failover s", "overlaps", "status -o json s", "ok",
    ]  # fmt: skip
    print("\n" + table(headers, rows))
    sizes = [
        [
            "10",
            small["payload_bytes_max"],
            small["header_bytes_max"],
            small["writes_per_s_per_agent"],
        ]
    ] + [
        [
            str(r["apps"]),
            r["renewal"]["payload_bytes_max"],
            r["renewal"]["header_bytes_max"],
            r["renewal"]["writes_per_s_per_agent"],
        ]
        for r in results
    ]
    print("\nsession renewal messages")
    print(table(["apps", "payload B", "headers B", "renewals/s per agent"], sizes))
    if max(s[1] for s in sizes) > small["payload_bytes_max"] + 16:
        failed.append("renewal payload grows with the number of applications")
    path = save("apps", {"params": vars(args), "renewal_at_10": small, "runs": results})
    print(f"\nwrote {path}")
    for line in failed:
        print(f"MISSED: {line}", file=sys.stderr)
    return 1 if failed and not args.no_check else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
