"""A thousand applications (issue 17): start, idle cost, failover, status, renewal size.

Three sites on loopback (one nats-server and one agent each, a 3-node JetStream cluster
with one lease store per site), N stateful AbsoluteConsistency Process applications
(``sleep 100000.<i>``, so every workload is told apart in /proc), applied with one
``harmony-agent apply -f``. Measured per ttl:

* ``start``: apply -> every application running exactly once (polled in /proc every 100 ms;
  any application seen twice at once is an overlap);
* ``session losses``: "validity ran out" / "session lost" lines in the agents' logs;
* ``idle``: CPU (% of one core) and RSS of each agent plus its fence over 30 s, with about
  N/3 workloads each (workloads themselves excluded);
* ``failover``: SIGKILL the agent holding the most applications -> all of them running
  elsewhere, none twice;
* ``status``: ``harmony-agent status -o json`` wall time with N applications;
* ``renewal``: size of one session record (the message every renewal writes).

    .venv/bin/python bench/apps.py [--apps 1000] [--ttl 2,10] [--idle 30]

Results: ``bench/results/apps.json``; the table goes into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
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

from bench.common import machine, save, table
from mesh.names import session_key, store_bucket
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.ports import free_port
from tests.harness.wait import eventually

SITES = ("site-a", "site-b", "site-c")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SLEEP = re.compile(rb"^sleep\x00100000\.(\d+)\x00")


def workloads() -> dict[int, list[int]]:
    """Application index -> pids of its running workload processes."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        m = SLEEP.match(cmd)
        if m:
            out.setdefault(int(m.group(1)), []).append(int(entry.name))
    return out


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


class World:
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

    async def start(self) -> None:
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

    def stop(self) -> None:
        for agent in self.agents:
            agent.kill()
        for node in self.nodes:
            node.stop()
        subprocess.run(["pkill", "-f", "^sleep 100000\\."], check=False)

    def cli(self, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args, "-s", self.nodes[0].url, "--timeout", "30s"],
            capture_output=True,
            text=True,
            check=False,
        )
        return time.monotonic() - started, done

    def session_losses(self) -> int:
        pattern = ("validity ran out", "session lost in one store")
        return sum(a.log(50_000_000).count(p) for a in self.agents for p in pattern)


async def watch_until_all(
    n: int, timeout: float, old: dict[int, set[int]] | None = None
) -> dict[str, Any]:
    """Poll /proc until every application runs exactly once (and, for those in ``old``,
    as a new process); count applications seen running twice at once meanwhile."""
    started = time.monotonic()
    overlaps: set[int] = set()
    moved = old or {}
    while time.monotonic() - started < timeout:
        running = workloads()
        overlaps |= {i for i, pids in running.items() if len(pids) > 1}
        ok = len(running) == n and all(len(p) == 1 for p in running.values())
        if ok and all(not (set(running[i]) & pids) for i, pids in moved.items()):
            return {"seconds": round(time.monotonic() - started, 3), "overlaps": len(overlaps)}
        await asyncio.sleep(0.1)
    running = workloads()
    return {"seconds": None, "running": len(running), "overlaps": len(overlaps)}


async def idle_cost(world: World, seconds: float) -> list[dict[str, Any]]:
    rows = []
    samples = {}
    for agent in world.agents:
        assert agent.proc is not None
        pid = agent.proc.pid
        fence = fence_of(pid)
        pids = [pid] + ([fence] if fence else [])
        samples[agent.site] = (pids, sum(cpu_seconds(p) for p in pids))
    await asyncio.sleep(seconds)
    for agent in world.agents:
        pids, before = samples[agent.site]
        used = sum(cpu_seconds(p) for p in pids) - before
        assert agent.proc is not None
        rows.append(
            {
                "agent": agent.agent_id,
                "workloads": sum(len(children(p)) for p in pids[1:]),
                "cpu_pct": round(100 * used / seconds, 2),
                "rss_mb": round(sum(rss_mb(p) for p in pids), 1),
            }
        )
    return rows


async def renewal_bytes(world: World) -> int:
    nc = await nats.connect(world.nodes[0].url)
    try:
        kv = await nc.jetstream().key_value(store_bucket("site-a"))
        entry = await kv.get(session_key("site-a", "n1"))
        return len(entry.value or b"")
    finally:
        await nc.close()


async def one_ttl(n: int, ttl: float, idle: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-apps-") as tmp:
        world = World(Path(tmp), ttl)
        try:
            await world.start()
            path = Path(tmp) / "apps.yaml"
            path.write_text(apps_yaml(n))
            losses_before = world.session_losses()
            apply_s, done = world.cli("apply", "-f", str(path))
            assert done.returncode == 0, done.stderr
            start = await watch_until_all(n, 120)
            start["apply_cli_s"] = round(apply_s, 3)
            start["session_losses"] = world.session_losses() - losses_before
            print(f"  ttl {ttl:g}: start {json.dumps(start)}", flush=True)
            idle_rows = await idle_cost(world, idle)
            print(f"  ttl {ttl:g}: idle {json.dumps(idle_rows)}", flush=True)
            status_s, status = world.cli("status", "-o", "json")
            assert status.returncode == 0, status.stderr
            status_apps = len(json.loads(status.stdout)["applications"])
            renewal = await renewal_bytes(world)
            # Failover: the agent holding most applications dies.
            fences = {a.agent_id: fence_of(a.proc.pid) if a.proc else None for a in world.agents}
            victim = max(world.agents, key=lambda a: len(children(fences[a.agent_id] or 0)))
            assert victim.proc is not None
            mine = set(children(fences[victim.agent_id] or 0))
            old = {i: set(p) for i, p in workloads().items() if set(p) & mine}
            os.kill(victim.proc.pid, signal.SIGKILL)
            fo = await watch_until_all(n, 60 + ttl, old)
            fo["moved"] = len(old)
            print(f"  ttl {ttl:g}: failover {json.dumps(fo)}", flush=True)
            return {
                "ttl": ttl,
                "apps": n,
                "start": start,
                "idle": idle_rows,
                "status_json_s": round(status_s, 3),
                "status_apps": status_apps,
                "renewal_bytes": renewal,
                "failover": fo,
            }
        finally:
            world.stop()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--ttl", default="2,10")
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()
    results = []
    for ttl in [float(t) for t in args.ttl.split(",") if t]:
        print(f"{args.apps} applications, ttl {ttl:g}s", flush=True)
        results.append(await one_ttl(args.apps, ttl, args.idle))
    rows = []
    for r in results:
        idle = r["idle"]
        rows.append(
            [
                f"{r['ttl']:g}",
                r["apps"],
                r["start"]["seconds"],
                r["start"]["session_losses"],
                r["start"]["overlaps"] + r["failover"]["overlaps"],
                max(i["cpu_pct"] for i in idle),
                max(i["rss_mb"] for i in idle),
                r["failover"]["moved"],
                r["failover"]["seconds"],
                r["status_json_s"],
                r["renewal_bytes"],
            ]
        )
    headers = [
        "ttl", "apps", "all running s", "session losses", "overlaps", "idle cpu % (max agent)",
        "rss MB (agent+fence)", "failover apps", "failover s", "status -o json s", "renewal B",
    ]  # fmt: skip
    print("\n" + table(headers, rows))
    path = save("apps", {"machine": machine(), "runs": results})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
