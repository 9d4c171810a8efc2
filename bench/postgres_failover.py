"""PostgreSQL failover under real agents on three netns sites: write unavailability.

What a client sees: a writer inserts increasing ids through the libpq multi-host string
(``target_session_attrs=read-write``, ``connect_timeout=2``) with ``synchronous: true``,
one autocommit INSERT after another. *Write unavailability* is the time from the last write
acknowledged by the old primary to the first acknowledged by the new one (both CLOCK_BOOTTIME
in this process, which includes the client's own reconnects). Scenarios, each repeated
``--runs`` times on one mesh per ttl:

* ``crash``: kill -9 of the primary's whole site (agent, postgres, nats-server); the site
  is started again afterwards and its database rejoins as a replica before the next run.
* ``cut``: the primary's site is cut off; healed (and rejoined) before the next run.
* ``planned``: ``harmony.cmd.app.<name>.failover`` (what ``cmd failover`` sends) to the
  next site.

Every run also checks that every acknowledged id is on the new primary, and a probe writing
to each site's server directly counts overlapping write-accepting windows (must be 0).

    sudo .venv/bin/python bench/postgres_failover.py [--runs 5] [--ttl 5,10]
        [--scenario crash,cut,planned]

Needs root (network namespaces) and PostgreSQL 15 (``/usr/lib/postgresql/15/bin``).
Results: ``bench/results/postgres_failover.json``. Patroni's numbers (issue 13, same machine
class, Patroni 3.0.2, etcd 3.4, PostgreSQL 15, kill -9 of the primary's node) are printed
beside ours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.failover.conftest as fo
from bench.common import machine, pct, quiet, table
from tests.harness.netns import Sites
from tests.harness.wait import eventually
from tests.postgres.client import Writer, missing_ids
from tests.postgres.conftest import postgres_skip_reason
from tests.postgres.mesh import APP, SITES, PgMesh, Probe, make_certs, pg_application

RESULTS = Path(__file__).resolve().parent / "results" / "postgres_failover.json"
PATRONI = {
    "defaults (ttl 30, loop_wait 10)": 26.0,
    "ttl 20, loop_wait 1": 19.8,
    "ttl 10": 9.8,
}
"""Median write unavailability after kill -9 of the primary's node (issue 13)."""


async def _mesh(workdir: Path, base: Path, ttl: float) -> PgMesh:
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
    make_certs(base, [sites[s].data_ip for s in SITES])
    pg = PgMesh(stage, base)
    pg.start_agents()
    await stage.all_ready()
    await stage.put(pg_application(base, stage))
    first, _ = await pg.primary(timeout=180)
    for site in SITES:
        if site != first:
            await pg.replica_of(site, 1, timeout=180)
    return pg


async def _rejoined(pg: PgMesh, old: str, new: str) -> None:
    await pg.replica_of(old, await pg.timeline(new), timeout=120)


def _gap(writer: Writer, old_host: str, since: float) -> tuple[float, float, float]:
    """(unavailability, last ack on the old primary, first ack elsewhere after it)."""
    old_acks = [a.acked for a in writer.acks if a.server == old_host]
    last = max(old_acks)
    first = min(a.acked for a in writer.acks if a.server != old_host and a.acked > since)
    return first - last, last, first


async def _one(pg: PgMesh, writer: Writer, scenario: str) -> dict[str, Any]:
    old, token = await pg.primary(timeout=60)
    old_host = pg.host(old)
    await eventually(
        lambda: any(a.server == old_host for a in writer.acks[-5:]),
        timeout=60,
        what="writes on the current primary",
    )
    await writer.wait_for_acks(20)
    fault_at = time.clock_gettime(time.CLOCK_BOOTTIME)
    if scenario == "crash":
        pg.kill_site(old)
    elif scenario == "cut":
        pg.stage.sites.cut(old)
    else:
        target = SITES[(SITES.index(old) + 1) % len(SITES)]
        reply = await pg.stage.command(f"harmony.cmd.app.{APP}.failover", {"to": target})
        assert reply.get("ok"), reply
    new, token2 = await pg.primary(not_site=old, timeout=120)
    await eventually(
        lambda: any(a.server == pg.host(new) and a.acked > fault_at for a in writer.acks),
        timeout=60,
        what="a write acknowledged by the new primary",
    )
    gap, _, first_new = _gap(writer, old_host, fault_at)
    row: dict[str, Any] = {
        "from": old,
        "to": new,
        "unavailable": round(gap, 3),
        "fault_to_first_write": round(first_new - fault_at, 3),
        "token_increased": token2 > token,
    }
    if scenario == "crash":
        pg.restart_site(old)
    elif scenario == "cut":
        pg.stage.sites.heal(old)
    await _rejoined(pg, old, new)
    return row


async def run_ttl(ttl: float, scenarios: list[str], runs: int, keep: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    base = Path(tempfile.mkdtemp(prefix="hpg", dir="/tmp"))
    os.chmod(base, 0o755)  # the database's OS user must traverse it
    pg: PgMesh | None = None
    try:
        pg = await _mesh(tmp, base, ttl)
        writer = Writer(pg.multihost(), interval=0.01)
        await writer.prepare()
        probe = Probe(pg)
        await probe.prepare()
        writer.start(max_seconds=3600)
        probe.start()
        rows: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
        for i in range(runs):
            for scenario in scenarios:
                row = await _one(pg, writer, scenario)
                rows[scenario].append(row)
                print(f"  ttl {ttl:g} {scenario} #{i + 1}: {json.dumps(row)}", flush=True)
        await writer.stop()
        await probe.stop()
        final, _ = await pg.primary(timeout=60)
        lost = await missing_ids(pg.dsn(final), writer.acked_ids)
        summary = {}
        for scenario, got in rows.items():
            values = [r["unavailable"] for r in got]
            summary[scenario] = {
                "runs": len(values),
                "p50": round(statistics.median(values), 3),
                "p99": round(pct(values, 99), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
            }
        return {
            "ttl": ttl,
            "rows": rows,
            "summary": summary,
            "acknowledged": len(writer.acks),
            "lost": len(lost),
            "overlaps": len(probe.overlaps()),
        }
    finally:
        if pg is not None:
            await pg.close()
            await pg.stage.close()
            for site in SITES:
                pg.kill_postgres(site)
            pg.stage.sites.teardown()
        if keep:
            print(f"  agent logs kept in {tmp}, databases in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttl", default="5,10", help="one or more ttls, comma-separated")
    parser.add_argument("--scenario", default="crash,cut,planned")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep agent logs and databases")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/postgres_failover.py needs root (network namespaces)", file=sys.stderr)
        return 2
    reason = postgres_skip_reason()
    if reason:
        print(f"bench/postgres_failover.py: {reason}", file=sys.stderr)
        return 2
    quiet()
    started = time.monotonic()
    scenarios = [s for s in args.scenario.split(",") if s]
    load = os.getloadavg()
    results: dict[str, Any] = {
        "machine": machine(),
        "load_before": [round(v, 2) for v in load],
        "targets": {"crash, cut": "p50 <= ttl + 3 s", "planned": "p50 <= 2 s", "lost": 0},
        "patroni": PATRONI,
        "runs": {},
    }
    rows = []
    for ttl in [float(t) for t in args.ttl.split(",") if t]:
        print(f"ttl {ttl:g}s: {args.runs} runs of {', '.join(scenarios)}", flush=True)
        res = await run_ttl(ttl, scenarios, args.runs, args.keep)
        results["runs"][f"{ttl:g}"] = res
        for scenario, s in res["summary"].items():
            target = 2.0 if scenario == "planned" else ttl + 3.0
            rows.append(
                [
                    scenario,
                    f"{ttl:g}",
                    s["runs"],
                    s["p50"],
                    s["p99"],
                    s["max"],
                    f"<= {target:g}",
                    res["lost"],
                    res["overlaps"],
                ]
            )
    results["load_after"] = [round(v, 2) for v in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    headers = ["scenario", "ttl", "runs", "p50 s", "p99 s", "max s", "target p50", "lost"]
    print("\n" + table([*headers, "overlaps"], rows))
    print("\nPatroni 3.0.2 / etcd 3.4 / PostgreSQL 15, kill -9 of the primary's node (median):")
    for label, value in PATRONI.items():
        print(f"  {label}: {value:g} s")
    print(f"\nload average before {load}, after {os.getloadavg()}; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
