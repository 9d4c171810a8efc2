"""A lease claimed in fewer stores than the session is anchored in follows its own deadline.

Seen in CI: the lease was won in two of three stores (the third store's watch was not up
yet), so it did not follow the anchored session and the main loop pushed it a fixed
deadline on every renewal. With the main loop busy for longer than a ttl (a start storm),
no push came, the fence killed the healthy workload at the stale deadline, and it was
restarted. The session thread now writes each claim support's deadline itself; the fence
must follow it, and stop at it once it stops moving.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.topologies.test_fence_batch import _dead, boottime, events, fence, spawn

GROUP = "n2=e2,n3=e3"
OTHER = "n1=e1,n2=e2"


def in_group(wid: str, log: Path, deadline: float, group: str) -> bytes:
    cmd = json.loads(spawn(wid, log, "follow", deadline))
    cmd["group"] = group
    return json.dumps(cmd).encode() + b"\n"


def test_a_workload_follows_its_claim_support_and_stops_when_it_stops_moving(
    tmp_path: Path,
) -> None:
    with fence() as (proc, session):
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None
        os.write(session, b"-inf\n")  # the anchored session counts for neither workload
        start = boottime()
        stdin.write(in_group("kept", tmp_path / "kept.log", start + 0.5, GROUP))
        stdin.write(in_group("stale", tmp_path / "stale.log", start + 0.5, OTHER))
        stdin.flush()
        started = events(stdout, 2)
        assert [e["ev"] for e in started] == ["started", "started"], started
        kept = next(e["pid"] for e in started if e["id"] == "kept")
        # The session thread renews: only GROUP's support is written (OTHER's stores lapsed).
        while boottime() < start + 1.5:
            os.write(session, json.dumps({"groups": {GROUP: boottime() + 0.5}}).encode() + b"\n")
            time.sleep(0.05)  # the renewal cadence being simulated, not a synchronisation
        ended = events(stdout, 1)[0]
        assert ended["id"] == "stale" and ended["reason"] == "deadline", ended
        assert not _dead(kept), "a workload whose claim support kept renewing was killed"
        # Renewals stop: it dies at the last deadline written for its support.
        last = events(stdout, 1)[0]
        assert last["id"] == "kept" and last["reason"] == "deadline", last
