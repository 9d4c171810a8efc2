"""Start-up and round-trip time of the ``harmony-agent`` command line (issue 15, item 1).

Targets, median of 10 on the project's 2-core machine: ``--version`` and ``--help`` at most
150 ms; ``status`` and ``cmd ping`` against a live agent at most 300 ms. Each sample is the
wall time of one ``harmony-agent`` process, from fork to exit, as an operator sees it.

The mesh is real: one nats-server and one agent (``harmony-agent run`` with a generated
config, as the tests start them) holding one stateful Process application. The commands
find the server through ``HARMONY_NATS_URL``, which every version of the CLI accepts.

Sources are byte-compiled first (``compileall``), as ``pip install`` does for a wheel: an
editable checkout run with PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every module
of the project on every run and measure the compiler, not the CLI (``--no-compile``
measures exactly that).

    .venv/bin/python bench/cli.py [--runs 10] [--out bench/results/cli.json]
                                  [--compare bench/results/cli-before.json]
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

TARGETS = {"--version": 0.150, "--help": 0.150, "status": 0.300, "cmd ping": 0.300}
COMMANDS: dict[str, list[str]] = {
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
  placement: {sites: [bench]}
  score: {kind: Process, command: [sleep, "3600"], stop_timeout: 1s}
"""


def cli_binary() -> str:
    beside = Path(sys.executable).parent / "harmony-agent"
    if not beside.exists():
        raise SystemExit(f"{beside} not found: run `make .venv/bin/activate` first")
    return str(beside)


def once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return elapsed


def measure(runs: int, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    binary = cli_binary()
    out: dict[str, dict[str, Any]] = {}
    floor = [sys.executable, "-c", "pass"]
    for label, argv in [("python -c pass", floor)] + [
        (k, [binary, *v]) for k, v in COMMANDS.items()
    ]:
        once(argv, env)  # warm the page cache; not counted
        samples = [once(argv, env) for _ in range(runs)]
        out[label] = {
            "median": statistics.median(samples),
            "min": min(samples),
            "max": max(samples),
            "target": TARGETS.get(label),
            "samples": [round(s, 4) for s in samples],
        }
    return out


async def with_mesh(runs: int) -> tuple[dict[str, dict[str, Any]], str]:
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        work = Path(tmp)
        node = NatsNode(name="bench", workdir=work / "nats")
        node.start()
        agent: AgentProcess | None = None
        try:
            await node.wait_ready()
            agent = AgentProcess(
                site="bench", node="n1", workdir=work / "agent", servers=[node.url], ttl="5s"
            )
            agent.extra = {"log": {"level": "info"}}
            agent.start()
            await eventually(agent.ready, timeout=60, what="agent ready")
            env = {**os.environ, "HARMONY_NATS_URL": node.url}
            argv = [cli_binary(), "apply", "-f", "-"]
            applied = await asyncio.to_thread(
                subprocess.run, argv, input=APP.encode(), env=env, check=False
            )
            if applied.returncode != 0:
                raise RuntimeError("apply failed")

            def holding() -> bool:
                doc = subprocess.run(
                    [cli_binary(), "status", "-o", "json"],
                    env=env,
                    capture_output=True,
                    check=False,
                )
                apps = json.loads(doc.stdout or b"{}").get("applications", [])
                return any(a.get("holder") == "bench/n1" for a in apps)

            async def held() -> bool:
                return await asyncio.to_thread(holding)

            await eventually(held, timeout=60, interval=0.5, what="application running")
            return await asyncio.to_thread(measure, runs, env), node.url
        finally:
            if agent is not None:
                agent.stop()
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli.json")
    parser.add_argument("--compare", type=Path, default=None, help="an earlier result file")
    parser.add_argument("--no-compile", action="store_true", help="skip compileall")
    args = parser.parse_args()
    if not args.no_compile:
        for pkg in ("agent", "mesh", "scores", "topologies"):
            compileall.compile_dir(str(ROOT / pkg), quiet=1)
    load_before = os.getloadavg()
    results, _ = asyncio.run(with_mesh(args.runs))
    load_after = os.getloadavg()
    before: dict[str, Any] = {}
    if args.compare is not None:
        before = json.loads(args.compare.read_text()).get("results", {})
    rows = []
    for label, r in results.items():
        row: list[Any] = [label]
        if before:
            row.append(f"{before[label]['median'] * 1000:.0f}" if label in before else "-")
        row += [f"{r[k] * 1000:.0f}" for k in ("median", "min", "max")]
        row.append(f"{r['target'] * 1000:.0f}" if r["target"] else "-")
        rows.append(row)
    headers = ["command", *(["before ms"] if before else []), "median ms", "min", "max"]
    print(table([*headers, "target"], rows))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": machine(),
        "runs": args.runs,
        "compiled": not args.no_compile,
        "load_average": {"before": load_before, "after": load_after},
        "results": results,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
