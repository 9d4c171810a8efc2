"""Cost of one ``/metrics`` scrape with N applications placed on the agent's site.

The applications are fenced first, so nothing runs: what is measured is the exposition of
their series (13 per application), not 1,000 workloads. Prints the series count, the body
size and the median and worst of 20 scrapes (the HTTP round trip as the scraper sees it).

    .venv/bin/python bench/metrics.py [--apps 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats

from agent.application import Application
from mesh.names import STATE_BUCKET, app_key, fence_key
from tests.harness.agents import AgentProcess
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually


def app(i: int) -> bytes:
    doc = {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": f"app-{i}"},
        "spec": {
            "trait": "stateful",
            "placement": {"sites": ["site-a"]},
            "score": {"kind": "Process", "command": ["sleep", "600"]},
        },
    }
    return Application.model_validate(doc).to_json()


def scrape(url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        body: bytes = resp.read()
    return time.perf_counter() - started, body


async def run(apps: int, workdir: Path) -> dict[str, float]:
    node = NatsNode(name="solo", workdir=workdir / "nats", tags=("site:solo",))
    node.start()
    await node.wait_ready()
    agent = AgentProcess(
        site="site-a",
        node="n1",
        workdir=workdir / "a",
        servers=[node.url],
        ttl="10s",
        extra={"log": {"format": "json", "level": "warning"}},
    )
    agent.start()
    try:
        await eventually(agent.ready, timeout=60, what="agent ready")
        nc = await nats.connect(node.url)
        kv = await nc.jetstream().key_value(STATE_BUCKET)
        for i in range(apps):
            await kv.put(fence_key(f"app-{i}"), json.dumps({"by": "bench"}).encode())
        for i in range(apps):
            await kv.put(app_key(f"app-{i}"), app(i))
        await nc.close()
        url = f"http://{agent.health_host}:{agent.health_port}/metrics"
        await eventually(
            lambda: scrape(url)[1].count(b"harmony_app_running{") >= apps,
            timeout=300,
            interval=1.0,
            what="every application's series",
        )
        times: list[float] = []
        for _ in range(20):
            took, body = scrape(url)
            times.append(took)
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        return {
            "apps": apps,
            "series": series,
            "bytes": len(body),
            "scrape_median_ms": round(statistics.median(times) * 1000, 1),
            "scrape_max_ms": round(max(times) * 1000, 1),
        }
    finally:
        agent.stop()
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--apps", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="harmony-bench-metrics-") as tmp:
        print(json.dumps(asyncio.run(run(args.apps, Path(tmp)))))


if __name__ == "__main__":
    main()
