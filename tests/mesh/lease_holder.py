"""A lease contender in its own process, for kill -9 and partition tests and benchmarks.

    python tests/mesh/lease_holder.py --servers URL[,URL] --site a --node n1 --ttl 2 \
        --lease ledger [--lease ...] [--rank 0] --events FILE [--prove-stale S:KEY:TOKEN]

Writes one JSON object per line to FILE (flushed at once, so a kill -9 loses nothing
already written), every time on CLOCK_MONOTONIC (shared by all processes of the machine):

    {"ev": "ready", "t", "epoch", "pid"}
    {"ev": "acquired", "lease", "token", "t", "deadline"}
    {"ev": "renewed", "sent", "deadline", "rev"} after each successful session renewal
    {"ev": "lost", "lease", "token", "t", "why", "end"}
    {"ev": "stale", "session_cas", "lease_cas"}  with --prove-stale: "refused" or "landed"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
from typing import IO, Any

import nats
import structlog
from nats.errors import Error as NatsError

from mesh.bootstrap import ensure_mesh
from mesh.leases import LeaseManager
from mesh.names import agent_key, app_key
from mesh.session import RenewResult, Session


class Events:
    def __init__(self, path: str) -> None:
        self._f: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 - lives with the process

    def emit(self, ev: str, **fields: Any) -> None:
        self._f.write(json.dumps({"ev": ev, **fields}) + "\n")
        self._f.flush()


async def prove_stale(js: Any, session_key: str, spec: str) -> dict[str, str]:
    """Try the CAS writes the old holder would make with its stale revisions."""
    session_rev, lease_key, token = spec.split(":")
    state = await js.key_value("harmony-state")
    leases = await js.key_value("harmony-leases")
    out = {}
    for label, kv, key, rev in (
        ("session_cas", state, session_key, int(session_rev)),
        ("lease_cas", leases, lease_key, int(token)),
    ):
        try:
            await kv.update(key, b'{"stale": true}', last=rev)
            out[label] = "landed"
        except NatsError:
            out[label] = "refused"
    return out


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--servers", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--node", default="n1")
    p.add_argument("--ttl", type=float, default=2.0)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--lease", action="append", default=[])
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--step", type=float, default=0.1)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--events", required=True)
    p.add_argument("--prove-stale", default=None)
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    events = Events(args.events)

    nc = await nats.connect(servers=args.servers.split(","), reconnect_time_wait=0.2)
    js = nc.jetstream()
    buckets = await ensure_mesh(js, args.replicas)
    key = agent_key(args.site, args.node)
    if args.prove_stale:
        events.emit("stale", **(await prove_stale(js, key, args.prove_stale)))
    session = Session(
        buckets.state, key, f"{args.site}/{args.node}", ttl=args.ttl, margin=args.margin
    )

    def renewed(result: RenewResult, latency: float) -> None:
        if result is RenewResult.OK and session.last_write_sent is not None:
            events.emit(
                "renewed",
                sent=session.last_write_sent,
                deadline=session.valid_until,
                rev=session.revision,
            )

    session.on_renew.append(renewed)
    mgr = LeaseManager(js, session, step=args.step)

    def acquired(name: str, token: int, until: float) -> None:
        events.emit("acquired", lease=name, token=token, t=time.monotonic(), deadline=until)

    def lost(name: str, token: int, why: str) -> None:
        end = mgr.tenures[-1].end  # the tenure is recorded before callbacks run
        events.emit("lost", lease=name, token=token, t=time.monotonic(), why=why, end=end)

    mgr.on_acquired.append(acquired)
    mgr.on_lost.append(lost)
    opened = asyncio.Event()
    session.on_new_epoch.append(lambda _epoch: opened.set())
    await mgr.start()
    runner = asyncio.create_task(session.run())
    await opened.wait()
    events.emit("ready", t=time.monotonic(), epoch=session.epoch, pid=os.getpid())
    for name in args.lease:
        mgr.want(name, app_key(name), rank=args.rank)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for name in list(mgr.held()):
        await mgr.release(name)
    await mgr.stop()
    runner.cancel()
    await session.close()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
