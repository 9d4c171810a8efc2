"""Primary and replicas on one machine, driven through the PostgreSQL Interpret directly."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from scores.base import WorkloadState
from scores.postgres.interpret import eligible_for_promotion
from scores.roles import Role
from tests.harness.wait import eventually
from tests.postgres.client import Writer, missing_ids, multihost, query
from tests.postgres.conftest import Cluster, Node


async def _count(node: Node) -> int:
    rows = await query(node.dsn, "SELECT count(*) FROM harmony_test.acked")
    return int(rows[0][0])  # type: ignore[call-overload]


async def _caught_up(primary: Node, *replicas: Node) -> bool:
    want = (await primary.interpret.status()).position
    for replica in replicas:
        status = await replica.interpret.status()
        if want is None or status.position is None or status.position < want:
            return False
    return True


async def test_replicas_stream_over_verified_tls_and_report_status(cluster: Cluster) -> None:
    primary = await cluster.primary("a", token=5)
    r1 = await cluster.replica("b", primary)
    r2 = await cluster.replica("c", primary)

    writer = Writer(primary.dsn)
    await writer.prepare()
    for _ in range(20):
        assert await writer.write_one() is not None, writer.last_error
    await eventually(lambda: _caught_up(primary, r1, r2), timeout=20, what="replicas to catch up")
    for replica in (r1, r2):
        assert await missing_ids(replica.dsn, writer.acked_ids) == []

    for replica in (r1, r2):
        seen = await replica.interpret.status()
        top = await primary.interpret.status()  # after: reads may write WAL (hint bits)
        assert (top.role, top.timeline, top.lag_bytes) == (Role.PRIMARY, 1, 0), top
        assert (seen.role, seen.timeline) == (Role.REPLICA, 1), seen
        assert seen.position is not None and top.position is not None
        assert seen.position <= top.position
        assert "streaming" in seen.detail
        observed = await replica.interpret.observe()
        assert observed.state is WorkloadState.RUNNING and observed.extra["role"] == "replica"

    # Replication goes over TLS, authenticated by the replica's certificate (CN=replicator).
    rows = await query(
        primary.dsn,
        "SELECT r.application_name, s.ssl, s.client_dn FROM pg_stat_replication r "
        "JOIN pg_stat_ssl s USING (pid) ORDER BY 1",
    )
    assert rows == [
        (r1.application_name, True, "/O=harmony/OU=site-b/CN=replicator"),
        (r2.application_name, True, "/O=harmony/OU=site-a/CN=replicator"),
    ]
    conninfo = await query(r1.dsn, "SHOW primary_conninfo")
    assert "sslmode=verify-full" in str(conninfo) and "target_session_attrs=read-write" in str(
        conninfo
    )

    # Only a certificate from the trust bundle with CN=replicator may replicate.
    repl = f"host=127.0.0.1 port={primary.port} user=replicator replication=true connect_timeout=3"
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
        await query(f"{repl} sslmode=disable", "IDENTIFY_SYSTEM")
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        await query(f"{repl} sslmode=require", "IDENTIFY_SYSTEM")
    cert, key = cluster.certs.files["d"]
    verified = f"{repl} sslmode=verify-full sslrootcert={cluster.certs.bundle} sslcert={cert}"
    assert len(await query(f"{verified} sslkey={key}", "IDENTIFY_SYSTEM")) == 1
    # The checker notices what is missing.
    assert await missing_ids(r1.dsn, [1, 10**9]) == [10**9]

    # The term is recorded in the database and visible to clients, on every instance.
    for node in (primary, r1, r2):
        assert await query(node.dsn, "SELECT token FROM harmony.term") == [(5,)]
    assert await query(primary.dsn, "SHOW harmony.fencing_token") == [("5",)]

    # Idempotent.
    again = await primary.interpret.start_primary(primary.ctx())
    assert again.ok and not again.changed, again
    again = await r1.interpret.start_replica(r1.ctx(), primary.info())
    assert again.ok and not again.changed, again


async def test_synchronous_commit_waits_for_a_replica(cluster: Cluster) -> None:
    primary = await cluster.primary("a", tls=False, synchronous=True)
    r1 = await cluster.replica("b", primary, tls=False, synchronous=True)
    r2 = await cluster.replica("c", primary, tls=False, synchronous=True)
    outcome = await primary.interpret.set_sync_standbys([r1.application_name, r2.application_name])
    assert outcome.ok and outcome.changed, outcome
    assert await query(primary.dsn, "SHOW synchronous_standby_names") == [
        (f'ANY 1 ("{r1.application_name}", "{r2.application_name}")',)
    ]
    writer = Writer(primary.dsn)
    await writer.prepare()
    assert await writer.write_one() is not None, writer.last_error

    for replica in (r1, r2):
        assert (await replica.interpret.stop()).ok
    pending = asyncio.create_task(writer.write_one(timeout=120))

    async def waits_for_sync_rep() -> bool:
        rows = await query(
            primary.dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
            "AND query LIKE 'INSERT INTO harmony_test.acked%'",
        )
        return rows == [(1,)]

    await eventually(waits_for_sync_rep, timeout=20, what="the commit to wait for a replica")
    assert not pending.done()

    restarted = await r1.interpret.start_replica(r1.ctx(), primary.info())
    assert restarted.ok, restarted
    ack = await asyncio.wait_for(pending, 60)
    assert ack is not None, writer.last_error
    assert await missing_ids(r1.dsn, [ack.id]) == []


async def test_lagging_replica_reports_larger_lag(cluster: Cluster) -> None:
    primary = await cluster.primary("a")
    r1 = await cluster.replica("b", primary)
    r2 = await cluster.replica("c", primary)
    await query(r2.dsn, "SELECT pg_wal_replay_pause()")
    await query(
        primary.dsn,
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
    )

    async def r2_lags() -> bool:
        top, fresh, stale = (
            await primary.interpret.status(),
            await r1.interpret.status(),
            await r2.interpret.status(),
        )
        return (
            fresh.lag_bytes == 0
            and stale.lag_bytes is not None
            and stale.lag_bytes > 2 * 1024 * 1024
            and fresh.position == top.position
        )

    await eventually(r2_lags, timeout=30, what="r2 to lag and r1 to be current")
    top = await primary.interpret.status()
    fresh, stale = await r1.interpret.status(), await r2.interpret.status()
    assert stale.position is not None and fresh.position is not None
    assert stale.position < fresh.position
    spec = primary.interpret.spec
    assert eligible_for_promotion(spec, fresh, top.position)
    assert not eligible_for_promotion(spec, stale, top.position)
    assert not eligible_for_promotion(spec, top, top.position)


async def test_writer_through_a_multihost_string_follows_a_planned_switchover(
    cluster: Cluster,
) -> None:
    primary = await cluster.primary("a", synchronous=True, token=5)
    replica = await cluster.replica("b", primary, synchronous=True)
    dsn = multihost([("127.0.0.1", primary.port), ("127.0.0.1", replica.port)])
    writer = Writer(dsn, interval=0.005)
    await writer.prepare()
    writer.start()
    await writer.wait_for_acks(20)

    assert (await primary.interpret.demote()).ok
    promoted = await replica.interpret.promote(replica.ctx(token=9))
    assert promoted.ok, promoted
    # synchronous: the new primary acknowledges nothing until a replica is back.
    rejoined = await primary.interpret.start_replica(primary.ctx(), replica.info(9))
    assert rejoined.ok, rejoined
    await writer.wait_for_acks(20)
    await writer.stop()

    ports = [ack.port for ack in writer.acks]
    assert ports[0] == primary.port and ports[-1] == replica.port
    switch = ports.index(replica.port)
    assert set(ports[switch:]) == {replica.port}, "writes went back to the old primary"
    await eventually(lambda: _caught_up(replica, primary), timeout=20, what="rejoin")
    for node in (replica, primary):
        assert await missing_ids(node.dsn, writer.acked_ids) == []
    try:
        await query(primary.dsn, "INSERT INTO harmony_test.acked (id, port) VALUES (-1, 0)")
        raise AssertionError("the rejoined old primary accepted a write")
    except psycopg.errors.ReadOnlySqlTransaction:
        pass
