"""Start-up and round-trip time of the ``harmony-agent`` command line (issue 15, item 1).

Targets, median of 10 on the project's 2-core machine: ``--version`` and ``--help`` at most
150 ms; ``status`` and ``cmd ping`` against a live agent at most 300 ms. Each sample is the
wall time of one ``harmony-agent`` process, from fork to exit, as an operator sees it.

The mesh is real: one nats-server and two agents (``harmony-agent run`` with a generated
config, as the tests start them, sites ``bench-a`` and ``bench-b``) and one stateful Process
application. The commands find the server through ``HARMONY_NATS_URL``, which every
version of the CLI accepts.

Then the issue's end-to-end figure: a planned ``cmd failover`` from the moment the command
is launched to the moment the other agent has started the new instance (its ``started``
event, published once the workload process runs), alternating between the two sites.

``--baseline DIR`` also measures another checkout of the project (e.g. ``mkdir DIR && git
archive <commit> | tar -x -C DIR``) with the same interpreter and libraries. Its samples
are interleaved with this checkout's (one of each, command by command, round after round),
so that load from other users of a shared machine weighs on both alike.

Sources are byte-compiled first (``compileall``), as ``pip install`` does for a wheel: an
editable checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every module
of the project on every run and measure the compiler, not the CLI (``--no-compile``
measures exactly that).

    .venv/bin/python bench/cli.py [--runs 10] [--baseline DIR] [--out bench/results/cli.json]
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, table  # noqa: E402
from tests.harness.agents import AgentProcess  # noqa: E402
from tests.harness.nats import NatsNode  # noqa: E402
from tests.harness.wait import eventually  # noqa: E402

TARGETS = {
    "--version": 0.150,
    "--help": 0.150,
    "status": 0.300,
    "cmd ping": 0.300,
    "cmd failover -> started": 0.500,
}
COMMANDS: dict[str, list[str]] = {
    "python -c pass": [],
    "--version": ["--version"],
    "--help": ["--help"],
    "status": ["status"],
    "cmd ping": ["cmd", "ping"],
}
APP = """\
apiVersion: harmony/v1
kind: Application
metadata: {name: bench}
spec:
  trait: stateful
  placement: {sites: [bench-a, bench-b]}
  score: {kind: Process, command: [sleep, "3600"], stop_timeout: 1s}
"""


def cli_binary() -> str:
    beside = Path(sys.executable).parent / "harmony-agent"
    if not beside.exists():
        raise SystemExit(f"{beside} not found: run `make .venv/bin/activate` first")
    return str(beside)


def argv_of(label: str) -> list[str]:
    """The interpreter floor for context, else the console script an operator runs."""
    if label == "python -c pass":
        return [sys.executable, "-c", "pass"]
    return [cli_binary(), *COMMANDS[label]]


def once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    # From a neutral directory: `python -m` would otherwise import this checkout's code.
    done = subprocess.run(argv, env=env, capture_output=True, check=False, cwd="/")
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return elapsed


def summary(samples: list[float], label: str) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "target": TARGETS.get(label),
        "samples": [round(s, 4) for s in samples],
    }


def measure(runs: int, envs: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """variant -> command -> summary; variants alternate sample by sample."""
    samples: dict[str, dict[str, list[float]]] = {v: {c: [] for c in COMMANDS} for v in envs}
    for label in COMMANDS:
        for env in envs.values():
            once(argv_of(label), env)  # warm the page cache; not counted
        for _ in range(runs):
            for variant, env in envs.items():
                samples[variant][label].append(once(argv_of(label), env))
    return {
        v: {c: summary(s, c) for c, s in per_command.items()} for v, per_command in samples.items()
    }


async def failovers(url: str, env: dict[str, str], runs: int) -> dict[str, Any]:
    """Launch ``cmd failover bench --to <the other site>`` and wait for that site's
    ``started`` event; ``runs`` times, back and forth."""
    import nats

    nc = await nats.connect(url)
    started: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        await started.put((time.perf_counter(), json.loads(msg.data)))

    await nc.subscribe("harmony.events.*.*.started", cb=on_event)
    holder = await holder_of(env)
    samples: list[float] = []
    try:
        for _ in range(runs):
            target = "bench-b" if holder.startswith("bench-a/") else "bench-a"
            argv = [cli_binary(), "cmd", "failover", "bench", "--to", target]
            t0 = time.perf_counter()
            done = await asyncio.to_thread(
                subprocess.run, argv, env=env, capture_output=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"failover failed: {done.stderr.decode()}")
            while True:
                at, event = await asyncio.wait_for(started.get(), 30)
                if event.get("app") == "bench" and event.get("site") == target:
                    break
            samples.append(at - t0)
            holder = event["agent"]
            await asyncio.sleep(1)  # let the old holder settle as standby
    finally:
        await nc.close()
    return summary(samples, "cmd failover -> started")


async def holder_of(env: dict[str, str]) -> str:
    doc = await asyncio.to_thread(
        subprocess.run,
        [cli_binary(), "status", "-o", "json"],
        env=env,
        capture_output=True,
        check=False,
    )
    apps = json.loads(doc.stdout or b"{}").get("applications", [])
    holders = [a.get("holder") for a in apps if a.get("name") == "bench"]
    return str(holders[0]) if holders and holders[0] else ""


async def with_mesh(runs: int, baseline: Path | None) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        node = NatsNode(name="bench", workdir=work / "nats")
        node.start()
        agents: list[AgentProcess] = []
        try:
            await node.wait_ready()
            for site in ("bench-a", "bench-b"):
                agent = AgentProcess(
                    site=site, node="n1", workdir=work / site, servers=[node.url], ttl="5s"
                )
                agent.extra = {"log": {"level": "info"}}
                agent.start()
                agents.append(agent)
            for agent in agents:
                await eventually(agent.ready, timeout=60, what=f"{agent.agent_id} ready")
            env = {**os.environ, "HARMONY_NATS_URL": node.url}
            argv = [cli_binary(), "apply", "-f", "-"]
            applied = await asyncio.to_thread(
                subprocess.run, argv, input=APP.encode(), env=env, check=False
            )
            if applied.returncode != 0:
                raise RuntimeError("apply failed")

            async def held() -> bool:
                return bool(await holder_of(env))

            await eventually(held, timeout=60, interval=0.5, what="application running")
            envs = {"after": env}
            if baseline is not None:
                envs = {"before": {**env, "PYTHONPATH": str(baseline)}, **envs}
            results = await asyncio.to_thread(measure, runs, envs)
            results["after"]["cmd failover -> started"] = await failovers(node.url, env, runs)
            return results
        finally:
            for agent in agents:
                agent.stop()
            node.stop()


def ms(value: float) -> str:
    return f"{value * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli.json")
    parser.add_argument("--baseline", type=Path, default=None, help="an older checkout")
    parser.add_argument("--no-compile", action="store_true", help="skip compileall")
    args = parser.parse_args()
    baseline = args.baseline.resolve() if args.baseline else None
    if not args.no_compile:
        for root in (ROOT, baseline):
            for pkg in ("agent", "mesh", "scores", "topologies"):
                if root is not None:
                    compileall.compile_dir(str(root / pkg), quiet=1)
    load_before = os.getloadavg()
    results = asyncio.run(with_mesh(args.runs, baseline))
    load_after = os.getloadavg()
    rows = []
    for label, r in results["after"].items():
        row: list[Any] = [label]
        if "before" in results:
            b = results["before"].get(label)
            row += [ms(b["median"]), f"{ms(b['min'])}-{ms(b['max'])}"] if b else ["-", "-"]
        row += [ms(r["median"]), f"{ms(r['min'])}-{ms(r['max'])}"]
        row.append(ms(r["target"]) if r["target"] else "-")
        rows.append(row)
    headers = ["command"]
    if "before" in results:
        headers += ["before median ms", "before min-max"]
    headers += ["median ms", "min-max", "target"]
    print(table(headers, rows))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": machine(),
        "runs": args.runs,
        "compiled": not args.no_compile,
        "baseline": str(baseline) if baseline else None,
        "load_average": {"before": load_before, "after": load_after},
        "results": results["after"],
        **({"baseline_results": results["before"]} if "before" in results else {}),
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
