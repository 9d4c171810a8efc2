"""Promote, re-point, rejoin with pg_rewind, fall back to pg_basebackup: the role changes."""

from __future__ import annotations

import psycopg
import pytest

from scores.roles import Role
from tests.harness.wait import eventually
from tests.postgres.client import Writer, missing_ids, query
from tests.postgres.conftest import Cluster, Node


async def _pid(node: Node) -> int:
    rows = await query(node.dsn, "SELECT pg_postmaster_start_time()::text")
    del rows
    first = (node.data_dir / "postmaster.pid").read_text().splitlines()[0]
    return int(first)


async def _has(node: Node, ident: int) -> bool:
    return await missing_ids(node.dsn, [ident]) == []


async def test_promote_records_the_token_and_the_old_primary_rejoins_by_rewind(
    cluster: Cluster,
) -> None:
    old = await cluster.primary("a", token=5)
    new = await cluster.replica("b", old)
    other = await cluster.replica("c", old)
    writer = Writer(old.dsn)
    await writer.prepare()
    before = [await writer.write_one() for _ in range(10)]
    assert all(before), writer.last_error
    await eventually(lambda: _has(new, 10), timeout=20, what="replication to the new primary")
    await eventually(lambda: _has(other, 10), timeout=20, what="replication to the other")

    promoted = await new.interpret.promote(new.ctx(token=8))
    assert promoted.ok, promoted
    status = await new.interpret.status()
    assert (status.role, status.timeline) == (Role.PRIMARY, 2), status
    assert await query(new.dsn, "SELECT token FROM harmony.term") == [(8,)]
    assert await query(new.dsn, "SHOW harmony.fencing_token") == [("8",)]

    # The other replica switches to the new primary without a restart: it has received
    # nothing past the fork point.
    other_pid = await _pid(other)
    repointed = await other.interpret.start_replica(other.ctx(), new.info(8))
    assert repointed.ok and "now following" in repointed.message, repointed
    assert await _pid(other) == other_pid

    # The old primary was never stopped (the agent's fencing is not under test here): it
    # takes a write the new timeline will never have, then is demoted.
    diverged = await Writer(old.dsn, next_id=1000).write_one()
    assert diverged is not None
    after = Writer(new.dsn, next_id=2000)
    assert await after.write_one() is not None, after.last_error

    demoted = await old.interpret.demote(new.info(8))
    assert demoted.ok and "pg_rewind" in demoted.message, demoted
    assert "pg_basebackup" not in demoted.message, demoted
    assert (await old.interpret.status()).role is Role.REPLICA

    async def on_new_timeline() -> bool:
        seen = await old.interpret.status()
        return seen.timeline == 2 and "streaming" in seen.detail

    await eventually(on_new_timeline, timeout=20, what="the rejoined replica on timeline 2")
    await eventually(lambda: _has(old, 2000), timeout=20, what="the new timeline's write")
    await eventually(lambda: _has(other, 2000), timeout=20, what="the new timeline's write")
    assert not await _has(old, 1000), "the diverged write survived the rewind"
    assert await missing_ids(old.dsn, writer.acked_ids) == []
    assert await query(old.dsn, "SELECT token FROM harmony.term") == [(8,)]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await query(old.dsn, "INSERT INTO harmony_test.acked (id, port) VALUES (-1, 0)")
    print(f"timings: promote {new.interpret.timings}, rewind {old.interpret.timings}")


async def test_a_failed_rewind_falls_back_to_a_fresh_base_backup(cluster: Cluster) -> None:
    primary = await cluster.primary("a")
    writer = Writer(primary.dsn)
    await writer.prepare()
    assert await writer.write_one() is not None
    # A data directory of another cluster (another system identifier): pg_rewind refuses.
    stranger = await cluster.primary("b", token=1)
    assert (await stranger.interpret.stop()).ok
    victim = stranger.data_dir
    outcome = await stranger.interpret.start_replica(stranger.ctx(), primary.info())
    assert outcome.ok, outcome
    assert "pg_rewind failed" in outcome.message and "pg_basebackup" in outcome.message
    assert "different systems" in (stranger.interpret.last_rewind_error or "") or (
        stranger.interpret.last_rewind_error
    )
    moved = sorted(victim.parent.glob(f"{victim.name}.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "PG_VERSION").exists(), "old data must be kept"
    await eventually(lambda: _has(stranger, 1), timeout=20, what="the copy to hold the data")
    assert (await stranger.interpret.status()).role is Role.REPLICA


async def test_promotion_refuses_an_older_token(cluster: Cluster) -> None:
    primary = await cluster.primary("a", token=5)
    replica = await cluster.replica("b", primary)
    refused = await replica.interpret.promote(replica.ctx(token=3))
    assert not refused.ok and "stale-token" in refused.message, refused
    assert (await replica.interpret.status()).role is Role.REPLICA
    assert (await primary.interpret.status()).role is Role.PRIMARY


async def test_start_primary_never_turns_a_replica_into_a_primary(cluster: Cluster) -> None:
    primary = await cluster.primary("a", token=5)
    replica = await cluster.replica("b", primary)
    refused = await replica.interpret.start_primary(replica.ctx(token=6))
    assert not refused.ok and "is-replica" in refused.message, refused
    assert (await replica.interpret.status()).role is Role.REPLICA
