"""The ``logs`` verb: the tail of ``<state_dir>/workloads/<app>.log``, offset-following,
rotation, the size limit, and the refusals, over a real nats-server; then the CLI's
``logs`` against it (the agent is chosen from the instance reports)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.commands import CommandServer, LogsRequest, Reply
from agent.commands.models import MAX_LOG_BYTES
from tests.cli.conftest import Invoke
from tests.commands.conftest import FakeController, Plane
from tests.commands.helpers import connect, seed_world
from tests.harness.nats import NatsNode

SUBJECT = "harmony.cmd.site-a.node-1.logs"


@pytest.fixture
async def plane_with_logs(nats_server: NatsNode, tmp_path: Path) -> AsyncIterator[Plane]:
    nc, buckets = await connect(nats_server.url)
    await seed_world(buckets, nc)
    server = CommandServer(nc, buckets.state, site="site-a", node="node-1", state_dir=tmp_path)
    await server.start()
    (tmp_path / "workloads").mkdir()
    try:
        yield Plane(nats_server.url, nc, buckets, server, FakeController(), {})
    finally:
        await server.stop()
        await nc.close()


def log_file(plane: Plane) -> Path:
    assert plane.server.state_dir is not None
    return plane.server.state_dir / "workloads" / "ledger.log"


async def ask(plane: Plane, **body: object) -> Reply:
    return await plane.request(SUBJECT, json.dumps({"app": "ledger", **body}).encode())


async def test_tail_then_follow_from_the_offset(plane_with_logs: Plane) -> None:
    plane = plane_with_logs
    path = log_file(plane)
    path.write_text("".join(f"line {n}\n" for n in range(1, 201)))
    tail = await ask(plane, tail=3)
    assert tail.ok, tail.error
    assert tail.fields["data"] == "line 198\nline 199\nline 200\n"
    assert tail.fields["offset"] == path.stat().st_size
    assert tail.fields["agent"] == "site-a/node-1"

    with path.open("a") as fh:
        fh.write("line 201\npartial")
    more = await ask(plane, offset=tail.fields["offset"], inode=tail.fields["inode"])
    assert more.fields["data"] == "line 201\npartial" and more.fields["more"] is False
    nothing = await ask(plane, offset=more.fields["offset"], inode=more.fields["inode"])
    assert nothing.fields["data"] == "" and nothing.fields["restarted"] is False


async def test_rotation_and_truncation_restart_at_zero(plane_with_logs: Plane) -> None:
    plane = plane_with_logs
    path = log_file(plane)
    path.write_text("old 1\nold 2\n")
    first = await ask(plane)
    os.rename(path, path.with_suffix(".log.1"))  # what the guard's rotation does
    path.write_text("new 1\nnew 2\nnew 3\n")  # already longer than the old offset
    after = await ask(plane, offset=first.fields["offset"], inode=first.fields["inode"])
    assert after.fields["restarted"] is True
    assert after.fields["data"] == "new 1\nnew 2\nnew 3\n"

    path.write_text("")  # truncated in place: same inode, shorter than the offset
    cut = await ask(plane, offset=after.fields["offset"], inode=after.fields["inode"])
    assert cut.fields["restarted"] is True and cut.fields["data"] == ""


async def test_replies_are_size_limited(plane_with_logs: Plane) -> None:
    plane = plane_with_logs
    path = log_file(plane)
    line = "x" * 99 + "\n"
    path.write_text(line * (3 * MAX_LOG_BYTES // 100))
    tail = await ask(plane, tail=10_000)
    assert 0 < len(tail.fields["data"]) <= MAX_LOG_BYTES and tail.fields["data"].endswith(line)
    chunk = await ask(plane, offset=0, inode=tail.fields["inode"], max_bytes=1000)
    assert chunk.fields["data"] == line * 10 and chunk.fields["more"] is True
    assert chunk.fields["offset"] == 1000
    too_big = await ask(plane, offset=0, max_bytes=MAX_LOG_BYTES + 1)
    assert not too_big.ok and "max_bytes" in (too_big.error or "")


async def test_refusals(plane_with_logs: Plane) -> None:
    plane = plane_with_logs
    missing = await ask(plane)
    assert not missing.ok
    assert missing.error == (
        "no output of 'ledger' on site-a/node-1 (it has not run here as a Process workload)"
    )
    traversal = await plane.request(SUBJECT, b'{"app": "../../etc/passwd"}')
    assert not traversal.ok and traversal.error is not None and traversal.error.startswith("app:")
    no_dir = CommandServer(plane.nc, plane.buckets.state, site="site-a", node="node-9")
    reply = await no_dir.handle(LogsRequest(app="ledger"))
    assert not reply.ok and "no state directory" in (reply.error or "")


async def test_cli_logs_reads_from_the_running_agent(
    plane_with_logs: Plane, invoke: Invoke
) -> None:
    """seed_world: ledger runs on site-a/node-1 (standby on site-b, a stale report on the
    dead site-c); web runs on site-a and site-b."""
    plane = plane_with_logs
    log_file(plane).write_text("hello\nworld\n")
    result = await invoke("logs", "ledger", "--tail", "1", "-s", plane.url)
    assert (result.exit_code, result.stdout) == (0, "world\n"), result.output

    ambiguous = await invoke("logs", "web", "-s", plane.url)
    assert ambiguous.exit_code == 2
    assert "web is on site-a/node-1, site-b/node-1: choose one with --site" in ambiguous.stderr
    chosen = await invoke("logs", "web", "--site", "site-b", "-s", plane.url, "--timeout", "1s")
    assert chosen.exit_code == 1  # site-b/node-1 has no command server here
    assert "no agent serves harmony.cmd.site-b.node-1.logs" in chosen.stderr
    unknown = await invoke("logs", "nope", "-s", plane.url)
    assert unknown.exit_code == 1 and "unknown application nope" in unknown.stderr
