"""Application failover gaps on three netns sites (real nats-servers, agents, workloads).

Gap = first tick of the new instance - last tick of the old one, from the shared tick
history (CLOCK_MONOTONIC, 10 ms ticks). Scenarios, each repeated ``--runs`` times on one
mesh (the next run fails over from wherever the application runs now):

* ``crash``: SIGKILL the holder's agent (AbsoluteConsistency). Target p50 <= ttl + 0.5 s.
* ``cut``: cut the holder's site off (AbsoluteConsistency). Target p50 <= ttl + the NATS
  re-election; the majority's write stall (cut -> first successful KV write from a
  majority site) is measured in the same run and reported beside it.
* ``planned``: ``harmony.cmd.app.<name>.failover`` (what ``cmd failover`` sends). Target
  p50 <= 200 ms.

Every run also counts overlapping intervals (must be 0 for AbsoluteConsistency).

    .venv/bin/python bench/app_failover.py [--runs 10] [--ttl 2] [--scenario crash,cut,planned]
    [--svg docs/img/partition-timeline.svg]   # also draw one SplitBrainAllowed partition

Needs root (network namespaces). Results: ``bench/results/app_failover.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.failover.conftest as fo
from mesh.names import LEASES_BUCKET, STATE_BUCKET
from tests.harness import history
from tests.harness.netns import Sites
from tests.harness.wait import eventually

APP = "ledger"
SITES = ("site-a", "site-b", "site-c")
RESULTS = Path(__file__).resolve().parent / "results" / "app_failover.json"


async def _mesh(workdir: Path, ttl: float) -> fo.Stage:
    fo.TTL = ttl
    sites = Sites(workdir / "sites")
    sites.setup()
    sites.start_nats()
    for site in sites.sites.values():
        assert site.nats is not None
        await site.nats.wait_ready(30)
    await fo.mesh_ready(sites)
    await fo.precreate_r3(sites)
    stage = fo.Stage(sites, workdir, workdir / "history.txt")
    stage.history.touch(mode=0o666)
    for name in SITES:
        stage.agent(name)
    await stage.all_ready()
    return stage


async def _write_stall(stage: fo.Stage, majority: str, since: float) -> float:
    """Seconds from ``since`` until a client on ``majority`` writes both buckets again."""
    import nats

    nc = await nats.connect(stage.sites[majority].url, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=1)
        for bucket in (STATE_BUCKET, LEASES_BUCKET):

            async def put(bucket: str = bucket) -> bool:
                kv = await js.key_value(bucket)
                await kv.put("bench.probe", b"x")
                return True

            await eventually(put, timeout=60, interval=0.02, what=f"write to {bucket}")
        return time.monotonic() - since
    finally:
        await nc.close()


async def _one(stage: fo.Stage, scenario: str, ttl: float) -> dict[str, Any]:
    first = await stage.one_running(APP, timeout=60)
    holder = stage.agent_of(first)
    stall: float | None = None
    if scenario == "crash":
        holder.kill()
        second = await stage.one_running(APP, not_site=first.site, timeout=60)
        stage.start(holder)
        await eventually(holder.ready, timeout=60, what="restarted agent ready")
    elif scenario == "cut":
        stage.sites.cut(first.site)
        cut_at = time.monotonic()
        majority = next(s for s in SITES if s != first.site)
        stall_task = asyncio.create_task(_write_stall(stage, majority, cut_at))
        second = await stage.one_running(APP, not_site=first.site, timeout=90)
        stall = await stall_task
        stage.sites.heal(first.site)
        await eventually(holder.ready, timeout=90, what="cut agent ready after heal")
    else:
        target = next(s for s in SITES if s != first.site)

        async def ask() -> dict[str, Any] | None:
            reply = await stage.command(f"harmony.cmd.app.{APP}.failover", {"to": target})
            return reply if reply.get("ok") else None

        await eventually(ask, timeout=20, interval=0.1, what="failover accepted")
        second = await stage.one_running(APP, not_site=first.site, timeout=30)
    insts = stage.instances(APP)
    return {
        "gap": (second.first_ns - first.last_ns) / 1e9,
        "overlaps": len(history.overlaps(insts)),
        "write_stall": stall,
        "from": first.site,
        "to": second.site,
    }


def _summary(rows: list[dict[str, Any]], ttl: float) -> dict[str, Any]:
    gaps = [r["gap"] for r in rows]
    stalls = [r["write_stall"] for r in rows if r["write_stall"] is not None]
    out = {
        "runs": len(rows),
        "overlaps": max((r["overlaps"] for r in rows), default=0),
        "gap_p50": round(history.percentile(gaps, 50), 3),
        "gap_p99": round(history.percentile(gaps, 99), 3),
        "gap_max": round(max(gaps), 3) if gaps else None,
    }
    if stalls:
        out["write_stall_p50"] = round(history.percentile(stalls, 50), 3)
        out["write_stall_p99"] = round(history.percentile(stalls, 99), 3)
        # Two populations: the cut took a KV stream leader (writes stall for the JetStream
        # re-election) or it did not (the gap is the ttl expiry alone).
        for label, pick in (("leader_cut", True), ("follower_cut", False)):
            sub = (
                [r["gap"] for r in rows if (r["write_stall"] or 0) > 1.0]
                if pick
                else [r["gap"] for r in rows if (r["write_stall"] or 0) <= 1.0]
            )
            out[f"{label}_runs"] = len(sub)
            if sub:
                out[f"{label}_gap_p50"] = round(history.percentile(sub, 50), 3)
        out["gap_within_ttl_plus_stall"] = all(
            r["gap"] <= ttl + (r["write_stall"] or 0) + 0.5 for r in rows
        )
    return out


async def run_scenario(scenario: str, runs: int, ttl: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{scenario}-") as tmp:
        stage = await _mesh(Path(tmp), ttl)
        try:
            await stage.put(fo.application(APP, stage.history))
            rows = []
            for i in range(runs):
                row = await _one(stage, scenario, ttl)
                rows.append(row)
                print(f"  {scenario} #{i + 1}: {json.dumps(row)}", flush=True)
            return {"summary": _summary(rows, ttl), "rows": rows}
        finally:
            await stage.close()
            stage.sites.teardown()


async def partition_timeline(svg: Path, ttl: float) -> Path:
    """One SplitBrainAllowed partition of the holder's site, drawn from its history."""
    with tempfile.TemporaryDirectory(prefix="bench-timeline-") as tmp:
        stage = await _mesh(Path(tmp), ttl)
        try:
            await stage.put(fo.application(APP, stage.history, strategy="SplitBrainAllowed"))
            first = await stage.one_running(APP, timeout=60)
            t_cut = time.monotonic_ns()
            stage.sites.cut(first.site)
            await eventually(
                lambda: any(i.site != first.site for i in stage.running_now(APP)),
                timeout=60,
                what="replacement",
            )
            await eventually(
                lambda: time.monotonic_ns() - t_cut > 10e9, timeout=20, what="10 s of partition"
            )
            t_heal = time.monotonic_ns()
            stage.sites.heal(first.site)
            await eventually(
                lambda: (
                    len(stage.running_now(APP)) == 1
                    and time.monotonic_ns() - t_heal > 3 * ttl * 1e9
                ),
                timeout=60,
                what="reconciled",
            )
            insts = stage.instances(APP)
            marks = {"cut": t_cut, "heal": t_heal}
            text = render(insts, marks, title=f"SplitBrainAllowed, ttl {ttl:g}s")
            await asyncio.to_thread(_save, svg, text, stage.history)
            return svg
        finally:
            await stage.close()
            stage.sites.teardown()


def _save(svg: Path, text: str, hist: Path) -> None:
    svg.parent.mkdir(parents=True, exist_ok=True)
    svg.write_text(text)
    svg.with_suffix(".history.txt").write_text(hist.read_text())


def render(insts: list[history.Instance], marks: dict[str, int], *, title: str) -> str:
    """A small SVG: one bar per instance over time, vertical lines at the marks."""
    t0 = min([i.first_ns for i in insts] + list(marks.values()))
    t1 = max([i.last_ns for i in insts] + list(marks.values()))
    span = max(1, t1 - t0)
    left, width, row, top = 190, 640, 34, 40
    height = top + row * len(insts) + 50

    def x(t: int) -> float:
        return left + (t - t0) / span * width

    colours = {"site-a": "#2b6cb0", "site-b": "#c05621", "site-c": "#2f855a"}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 30}" '
        f'height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>',
    ]
    for n, inst in enumerate(insts):
        y = top + n * row
        colour = colours.get(inst.site, "#555")
        out.append(
            f'<text x="10" y="{y + 17}">{inst.site} token {inst.token}</text>'
            f'<rect x="{x(inst.first_ns):.1f}" y="{y + 4}" '
            f'width="{max(1.0, x(inst.last_ns) - x(inst.first_ns)):.1f}" height="18" '
            f'fill="{colour}"><title>{inst}</title></rect>'
        )
    axis_y = top + row * len(insts) + 10
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + width}" y2="{axis_y}" stroke="#000"/>')
    step = max(1, round(span / 1e9 / 10))
    for sec in range(0, int(span / 1e9) + 1, step):
        tx = x(t0 + sec * 1_000_000_000)
        out.append(
            f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 5}" stroke="#000"/>'
            f'<text x="{tx:.1f}" y="{axis_y + 18}" text-anchor="middle">{sec}s</text>'
        )
    for label, t in marks.items():
        mx = x(t)
        out.append(
            f'<line x1="{mx:.1f}" y1="{top - 8}" x2="{mx:.1f}" y2="{axis_y}" '
            f'stroke="#c53030" stroke-dasharray="4 3"/>'
            f'<text x="{mx + 3:.1f}" y="{top - 10}" fill="#c53030">{label}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--scenario", default="crash,cut,planned")
    parser.add_argument("--svg", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/app_failover.py needs root (network namespaces)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "ttl": args.ttl,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "targets": {
            "crash_gap_p50": args.ttl + 0.5,
            "cut_gap_p50": "ttl + NATS re-election (write_stall)",
            "planned_gap_p50": 0.2,
        },
        "scenarios": {},
    }
    for scenario in [s for s in args.scenario.split(",") if s]:
        print(f"{scenario}: {args.runs} runs, ttl {args.ttl:g}s", flush=True)
        results["scenarios"][scenario] = await run_scenario(scenario, args.runs, args.ttl)
        print(f"{scenario}: {json.dumps(results['scenarios'][scenario]['summary'])}", flush=True)
    if args.svg is not None:
        results["timeline_svg"] = str(await partition_timeline(args.svg, args.ttl))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'scenario':10} {'runs':>5} {'overlaps':>8} {'p50 gap':>8} {'p99 gap':>8}  stall p50")
    for name, res in results["scenarios"].items():
        s = res["summary"]
        stall = s.get("write_stall_p50", "")
        print(
            f"{name:10} {s['runs']:>5} {s['overlaps']:>8} {s['gap_p50']:>8} {s['gap_p99']:>8}"
            f"  {stall}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
