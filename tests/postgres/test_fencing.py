"""AbsoluteConsistency: a primary whose agent stops extending its deadline stops writing.

The "hung agent" is the test itself simply no longer calling ``extend_deadline``: the
watchdog runs detached on the database host and needs nothing from the agent. Lateness
is reported, and bounded as the Process Score's guard is (200 ms on a loaded machine).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import psycopg
import pytest

from scores.base import WorkloadState
from scores.postgres.host import boottime
from tests.harness.wait import eventually
from tests.postgres.client import Writer, query
from tests.postgres.conftest import Cluster, Node
from topologies.localhost import LocalhostTopology

LATE = 0.2


def _postmaster(node: Node) -> int:
    return int((node.data_dir / "postmaster.pid").read_text().splitlines()[0])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _tree(root: int) -> set[int]:
    """``root`` and every live process below it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


async def _timed_insert(dsn: str, sql: str) -> float | None:
    """When the INSERT's commit was acknowledged (CLOCK_BOOTTIME), or None if it failed."""
    try:
        await query(dsn, sql)
    except psycopg.Error as exc:
        print(f"busy statement failed: {exc}")
        return None
    return boottime()


async def test_writes_stop_at_the_deadline_once_extensions_stop(cluster: Cluster) -> None:
    primary = await cluster.primary("a")
    interpret = primary.interpret
    first = boottime() + 1.5
    held = await interpret.start_primary(primary.ctx(deadline=first))
    assert held.ok, held
    writer = Writer(primary.dsn)
    await writer.prepare()

    # The agent renews: writes go on past the first deadline.
    deadline = first
    while boottime() < first + 1.0:
        deadline = boottime() + 1.5
        interpret.extend_deadline(deadline)
        assert await writer.write_one() is not None, writer.last_error
    assert writer.acks[-1].sent > first

    # A statement busy on the CPU checks nothing but its own interrupts: it would commit
    # after the deadline if only the postmaster died. Time one, then start one so that it
    # straddles the deadline.
    busy = "SELECT count(*) FROM generate_series(1, 20000000)"
    interpret.extend_deadline(boottime() + 60)
    began = boottime()
    await query(primary.dsn, busy)
    took = boottime() - began
    interpret.extend_deadline(deadline := boottime() + max(1.5, took))

    # The agent hangs: nothing extends the deadline any more; a client keeps writing.
    pid = _postmaster(primary)
    members = _tree(pid)
    assert len(members) > 5, "expected the postmaster and its backends"
    writer.start()
    await asyncio.sleep(max(0.0, deadline - took / 2 - boottime()))  # schedules load only
    straddling = asyncio.create_task(
        _timed_insert(
            primary.dsn,
            f"INSERT INTO harmony_test.acked (id, port) "
            f"SELECT -1, inet_server_port() FROM ({busy}) AS s",
        )
    )
    await eventually(
        lambda: not any(_alive(p) for p in members),
        timeout=deadline - boottime() + 15,
        interval=0.01,
        what="postgres and every backend to be killed at the deadline",
    )
    await writer.stop()
    committed_at = await straddling
    print(f"busy statement: {took:.2f}s, committed: {committed_at and committed_at - deadline}")
    assert committed_at is None or committed_at <= deadline + LATE, (
        f"a statement committed {committed_at - deadline:.3f}s after the deadline"
    )

    late_acks = [ack for ack in writer.acks if ack.sent > deadline]

    def final_state() -> dict[str, object] | None:
        state = json.loads((primary.run_dir / "watchdog.json").read_text())
        return state if state.get("state") == "exited" else None

    state = await eventually(final_state, timeout=10, what="the watchdog to record the kill")
    print(f"watchdog killed {state['late'] * 1000:.1f} ms after the deadline")
    assert state["reason"] == "deadline"
    assert state["late"] <= LATE, state
    assert all(ack.sent <= deadline + LATE for ack in late_acks), late_acks
    assert writer.failures > 0, "the writer never noticed the fence"
    observed = await interpret.observe()
    assert (observed.state, observed.reason) == (WorkloadState.FAILED, "deadline"), observed
    with pytest.raises(psycopg.OperationalError):
        await query(primary.dsn, "SELECT 1")
    # The agent cannot resurrect it without a new deadline (a new lease).
    again = await interpret.start_primary(primary.ctx())
    assert not again.ok and "deadline" in again.message, again


async def test_a_restarted_agent_adopts_the_running_primary(cluster: Cluster) -> None:
    primary = await cluster.primary("a")
    held = await primary.interpret.start_primary(primary.ctx(deadline=boottime() + 30))
    assert held.ok, held
    pid = _postmaster(primary)
    await primary.interpret.close()

    # A new Interpret object, as after an agent restart: same spec, same host.
    restarted = primary.interpret.spec.interpret(LocalhostTopology())
    cluster.nodes.append(Node("a", restarted, primary.state_dir, primary.port, token=primary.token))
    adopted = await restarted.start_primary(primary.ctx(deadline=boottime() + 30))
    assert adopted.ok and not adopted.changed, adopted
    assert _postmaster(primary) == pid
    assert (primary.run_dir / "deadline").read_text().strip() != "none"


async def test_a_replica_runs_without_a_deadline_until_promoted(cluster: Cluster) -> None:
    primary = await cluster.primary("a")
    replica = await cluster.replica("b", primary)
    assert (replica.run_dir / "deadline").read_text().strip() == "none"
    replica.interpret.extend_deadline(boottime() + 0.5)  # ignored: replicas are not fenced
    assert (replica.run_dir / "deadline").read_text().strip() == "none"
    deadline = boottime() + 60
    promoted = await replica.interpret.promote(replica.ctx(token=9, deadline=deadline))
    assert promoted.ok, promoted
    assert float((replica.run_dir / "deadline").read_text()) == deadline
    too_late = await primary.interpret.promote(primary.ctx(token=10, deadline=boottime() - 1))
    assert not too_late.ok and "deadline" in too_late.message
