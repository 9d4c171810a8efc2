"""A holder process killed with SIGKILL: takeover after a full ttl, fencing, no resurrection."""

from __future__ import annotations

import time
from pathlib import Path

from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually
from tests.mesh.holder_proc import holder_argv, kill9, read_events, spawn_holder
from tests.mesh.lease_world import Contender

TTL = 2.0


async def test_killed_holder_is_taken_over_after_ttl_and_cannot_come_back(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    urls = nats_cluster.urls
    events = tmp_path / "holder.jsonl"
    opts = ("--ttl", str(TTL), "--margin", "0.2", "--lease", "ledger")
    argv = holder_argv([urls[0]], "site-a", events, *opts)
    proc = spawn_holder(argv, tmp_path / "holder.log")
    standby = Contender([urls[1]], "site-b", "n1", ttl=TTL, margin=0.2, step=0.05)
    try:
        acquired = await eventually(
            lambda: read_events(events, "acquired"), timeout=30, what="holder acquired"
        )
        old_token = acquired[0]["token"]
        await standby.start()
        standby.want(["ledger"], rank=1)
        # the holder keeps renewing: the standby must not take over a healthy holder
        await eventually(
            lambda: len(read_events(events, "renewed")) >= 4, timeout=10, what="renewals"
        )
        assert standby.held() == {}

        kill9(proc)
        killed = time.monotonic()
        await eventually(standby.held, timeout=TTL + 5, what="takeover")
        took = standby.acquired_at["ledger"]
        renewed = read_events(events, "renewed")
        last_sent = max(r["sent"] for r in renewed)
        last_deadline = max(r["deadline"] for r in renewed + acquired)
        assert took >= last_sent + TTL, "taken over before a full ttl since the last renewal"
        assert took >= last_deadline, "taken over while the old holder could still believe"
        assert took <= killed + TTL + 1.0, f"takeover {took - killed:.2f}s after the kill"
        new_token = standby.held()["ledger"]
        assert new_token > old_token

        # The old holder restarts with the same agent id: its stale CAS writes are refused,
        # it opens a new session, and it stays a follower of the healthy new holder.
        events2 = tmp_path / "holder2.jsonl"
        stale = f"{renewed[-1]['rev']}:app.ledger:{old_token}"
        argv2 = holder_argv([urls[0]], "site-a", events2, *opts, "--prove-stale", stale)
        proc = spawn_holder(argv2, tmp_path / "h2.log")
        proof = await eventually(lambda: read_events(events2, "stale"), timeout=30, what="proof")
        assert proof[0] == {"ev": "stale", "session_cas": "refused", "lease_cas": "refused"}
        await eventually(lambda: read_events(events2, "ready"), timeout=30, what="restarted")
        assert standby.session is not None
        rev = standby.session.revision or 0
        await eventually(
            lambda: (standby.session.revision or 0) >= rev + 2,  # type: ignore[union-attr]
            timeout=10,
            what="two more renewals of the new holder",
        )
        assert read_events(events2, "acquired") == []
        assert standby.held() == {"ledger": new_token}
    finally:
        if proc.poll() is None:
            kill9(proc)
        await standby.kill()
