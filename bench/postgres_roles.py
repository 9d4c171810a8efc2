"""PostgreSQL Score role changes, timed through the Interpret (no agent, one machine).

Per run: a primary and two replicas (TLS, synchronous), a writer through the multi-host
connection string, then the primary's postgres tree is SIGKILLed (its watchdog's deadline
is set to now) and a replica promoted. Measured: pg_promote() alone, promote() as a whole,
write unavailability (last ack on the old primary -> first ack on the new one, including
this script's own detection: the deadline is set, the kill observed, then promote is
called), pg_rewind of the killed old primary (with its automatic crash recovery), and
every acknowledged id found on the new primary.

    .venv/bin/python bench/postgres_roles.py --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scores.postgres.host import boottime
from tests.harness.wait import eventually
from tests.postgres.client import Writer, missing_ids, multihost
from tests.postgres.conftest import Cluster, make_certs, make_workdir


async def one_run() -> dict[str, float]:
    with make_workdir() as workdir:
        cluster = Cluster(workdir, make_certs(workdir / "certs"))
        try:
            primary = await cluster.primary("a", synchronous=True, token=5)
            r1 = await cluster.replica("b", primary, synchronous=True)
            r2 = await cluster.replica("c", primary, synchronous=True)
            await primary.interpret.set_sync_standbys([r1.application_name, r2.application_name])
            await primary.interpret.start_primary(primary.ctx(deadline=boottime() + 600))
            writer = Writer(multihost([("127.0.0.1", n.port) for n in (primary, r1, r2)]))
            await writer.prepare()
            writer.start()
            await writer.wait_for_acks(200)
            primary.interpret.extend_deadline(boottime())  # the lease ends now: fenced

            async def fenced() -> bool:
                return (await primary.interpret.observe()).reason == "deadline"

            await eventually(fenced, timeout=10, interval=0.01, what="the fence")
            promoted = await r1.interpret.promote(r1.ctx(token=8, deadline=boottime() + 600))
            assert promoted.ok, promoted
            await r2.interpret.start_replica(r2.ctx(), r1.info(8))
            await writer.wait_for_acks(50)
            await writer.stop()
            old = [a for a in writer.acks if a.port == primary.port]
            new = [a for a in writer.acks if a.port == r1.port]
            gap = new[0].acked - old[-1].acked
            started = time.monotonic()
            rejoined = await primary.interpret.demote(r1.info(8))
            rejoin = time.monotonic() - started
            assert rejoined.ok and "pg_rewind" in rejoined.message, rejoined
            lost = await missing_ids(r1.dsn, writer.acked_ids)
            assert lost == [], f"acknowledged writes lost: {lost[:10]}"
            return {
                "pg_promote_s": r1.interpret.timings["promote"],
                "unavailable_s": gap,
                "pg_rewind_s": primary.interpret.timings["rewind"],
                "rejoin_total_s": rejoin,
                "basebackup_s": r2.interpret.timings.get("basebackup", float("nan")),
                "acked": len(writer.acks),
            }
        finally:
            await cluster.close()


async def main(runs: int) -> None:
    results = []
    for index in range(runs):
        result = await one_run()
        results.append(result)
        print(f"run {index + 1}: " + json.dumps({k: round(v, 3) for k, v in result.items()}))
    for key in results[0]:
        values = sorted(r[key] for r in results)
        print(
            f"{key:16} median {statistics.median(values):7.3f}  min {values[0]:7.3f}  "
            f"max {values[-1]:7.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
