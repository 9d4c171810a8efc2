"""One lease holder in its own process, to be killed with SIGKILL by a benchmark.

A ``Contender`` (session thread + lease manager, exactly an agent's lease engine) that
wants the given leases at rank 0 and appends JSON lines to ``--events``:
``{"ev": "acquired", "name", "t"}`` and ``{"ev": "renewed", "sent"}`` (the send time of the
newest renewal that landed in any store), all on CLOCK_BOOTTIME, which every process on the
machine shares. ``{"ev": "ready"}`` once the session is open.

    python bench/lease_holder.py --url nats://... --stores n1,n2,n3 --site s --node n
        --ttl 2 --events FILE (--lease NAME ... | --leases-file FILE)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import quiet
from mesh.clock import boottime
from mesh.session import SessionView
from tests.mesh.lease_world import Contender


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--stores", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--node", default="n1")
    p.add_argument("--ttl", type=float, default=2.0)
    p.add_argument("--margin", type=float, default=None)
    p.add_argument("--step", type=float, default=0.05)
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--lease", action="append", default=[])
    p.add_argument("--leases-file", type=Path, default=None)
    args = p.parse_args()
    quiet()
    names = list(args.lease)
    if args.leases_file is not None:
        names += args.leases_file.read_text().split()
    import uvloop

    uvloop.run(hold(args, names))


async def hold(args: argparse.Namespace, names: list[str]) -> None:
    fd = os.open(args.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def event(**body: Any) -> None:
        os.write(fd, (json.dumps(body) + "\n").encode())  # one write: whole lines only

    margin = args.margin if args.margin is not None else max(0.05, args.ttl / 10)
    c = Contender(
        args.url,
        args.stores.split(","),
        args.site,
        args.node,
        ttl=args.ttl,
        margin=margin,
        step=args.step,
    )
    await c.start()
    assert c.manager is not None and c.session is not None
    c.manager.on_acquired.append(lambda name, *_: event(ev="acquired", name=name, t=boottime()))
    last = [float("-inf")]

    def renewed(view: SessionView) -> None:  # on the session thread: tiny
        fresh = max((s.fresh_until for s in view.stores.values()), default=float("-inf"))
        sent = fresh - args.ttl + margin
        if sent > last[0]:
            last[0] = sent
            event(ev="renewed", sent=sent)

    c.session.subscribe(renewed)
    renewed(c.session.view())  # the opening writes count: a holder may die before renewing
    event(ev="ready", t=boottime())
    c.want(names, rank=0)
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
