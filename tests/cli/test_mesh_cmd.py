"""``harmony-agent mesh init|show`` against a real nats-server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness.nats import NatsNode


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


async def test_init_creates_the_stores_once_and_refuses_another_list(
    nats_server: NatsNode,
) -> None:
    url = nats_server.url
    first = _cli("mesh", "init", "--stores", "solo", "--replicas", "1", "-s", url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().startswith("mesh ready: lease stores solo")
    assert "mesh descriptor written" not in first.stdout + first.stderr  # quiet
    again = _cli("mesh", "init", "--stores", "solo", "--replicas", "1", "-s", url)
    assert again.returncode == 0, again.stderr  # idempotent
    other = _cli("mesh", "init", "--stores", "solo,b", "-s", url)
    assert other.returncode == 1
    assert other.stderr.count("\n") == 1 and "mesh uses ['solo']" in other.stderr
    shown = _cli("mesh", "show", "-o", "json", "-s", url)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["stores"] == ["solo"]
    streams = {row["stream"]: row for row in info["streams"]}
    assert streams["KV_harmony-leases-solo"]["tags"] == ["site:solo"]
    assert streams["KV_harmony-leases-solo"]["replicas"] == 1
    assert {"KV_harmony-state", "KV_harmony-trust", "harmony-events"} <= set(streams)


@pytest.mark.parametrize(
    ("stores", "needle"),
    [("A", "'A' is not a site name"), ("a,a", "named twice"), (",", "at least one store")],
)
def test_bad_store_lists_are_one_line_exit_2(stores: str, needle: str) -> None:
    result = _cli("mesh", "init", "--stores", stores, "-s", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
