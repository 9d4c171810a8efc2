"""Footprint of an idle agent: start-to-ready, resident memory and CPU over a window.

Targets (issue 2): ready <= 2 s against a running mesh; RSS <= 80 MB; CPU <= 1 % of one
core over 60 s, idle, connected and heartbeating with ttl 5 s.

    .venv/bin/python bench/footprint.py [--window 60] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def start_to_ready(workdir: Path, url: str, run: int) -> tuple[float, AgentProcess]:
    agent = AgentProcess(
        site="bench", node=f"n{run}", workdir=workdir / f"a{run}", servers=[url], ttl="5s"
    )
    agent.extra = {"log": {"level": "info"}}
    t0 = time.monotonic()
    agent.start()
    while not agent.ready():
        if not agent.running():
            raise RuntimeError(agent.log())
        await asyncio.sleep(0.005)
    return time.monotonic() - t0, agent


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        node = NatsNode(name="bench", workdir=Path(tmp) / "nats")
        node.start()
        await node.wait_ready()
        try:
            ready_times = []
            for run in range(args.runs):
                elapsed, agent = await start_to_ready(Path(tmp), node.url, run)
                ready_times.append(elapsed)
                if run < args.runs - 1:
                    agent.stop()
            assert agent.proc is not None
            pid = agent.proc.pid
            await asyncio.sleep(5)  # let start-up work settle before the idle window
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            rss_samples = []
            while time.monotonic() - t0 < args.window:
                rss_samples.append(rss_mb(pid))
                await asyncio.sleep(1)
            cpu_pct = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            agent.stop()
        finally:
            node.stop()
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "start_to_ready_s": {
            "runs": len(ready_times),
            "p50": statistics.median(ready_times),
            "max": max(ready_times),
        },
        "rss_mb": {"max": max(rss_samples), "mean": statistics.fmean(rss_samples)},
        "cpu_percent_one_core": cpu_pct,
        "window_s": args.window,
        "ttl_s": 5.0,
    }
    print(f"{'metric':<28}{'value':>12}{'target':>12}")
    print(f"{'start to ready p50 (s)':<28}{result['start_to_ready_s']['p50']:>12.3f}{'<= 2':>12}")
    print(f"{'start to ready max (s)':<28}{result['start_to_ready_s']['max']:>12.3f}{'<= 2':>12}")
    print(f"{'RSS max (MB)':<28}{result['rss_mb']['max']:>12.1f}{'<= 80':>12}")
    print(f"{'CPU over window (%)':<28}{cpu_pct:>12.3f}{'<= 1':>12}")
    out = Path(__file__).parent / "results" / "footprint.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
