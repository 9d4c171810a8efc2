"""History checker, peer table and restart-safety state file: pure or local-only parts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from agent.controller.peers import PeerTable
from agent.controller.statefile import StateFile, alive, proc_start_time, stop_leftovers
from tests.harness import history

TICKER = Path(__file__).resolve().parents[1] / "workloads" / "ticker.py"
MS = 1_000_000


def _lines(*rows: tuple[int, str, str, int, int]) -> list[str]:
    return [f"{t * MS} {a} {s} {p} {k}" for t, a, s, p, k in rows]


def test_history_rebuilds_intervals_and_finds_overlaps() -> None:
    ticks = history.parse(
        [
            *_lines((0, "x", "site-a", 1, 1), (10, "x", "site-a", 1, 1), (20, "x", "site-a", 1, 1)),
            *_lines((25, "x", "site-b", 2, 2), (35, "x", "site-b", 2, 2)),
            *_lines((30, "x", "site-c", 3, 3)),
            "garbage line",
            "123 torn",
        ]
    )
    insts = history.instances(ticks, "x")
    assert [i.token for i in insts] == [1, 2, 3]
    assert insts[0].first_ns == 0 and insts[0].last_ns == 20 * MS and insts[0].ticks == 3
    assert insts[0].max_gap_ns == 10 * MS
    found = history.overlaps(insts)
    assert [(o.a.token, o.b.token) for o in found] == [(2, 3)]
    assert found[0].duration_ns == 0  # touching at one tick still counts as overlap
    assert history.handover_gaps(insts[:2]) == [0.005]
    assert history.overlaps(insts, per_site=True) == []


def test_percentile_nearest_rank() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert history.percentile(values, 50) == 2.0
    assert history.percentile(values, 99) == 4.0
    assert history.percentile([5.0], 50) == 5.0


def test_ticker_writes_comparable_monotonic_ticks(tmp_path: Path) -> None:
    path = tmp_path / "h.txt"
    env = {**os.environ, "HARMONY_APP": "x", "HARMONY_SITE": "s", "HARMONY_FENCING_TOKEN": "7"}
    before = time.monotonic_ns()
    proc = subprocess.Popen([sys.executable, str(TICKER), str(path)], env=env)
    try:
        deadline = time.monotonic() + 10
        while len(history.load(path)) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(5)
    (inst,) = history.instances(history.load(path))
    assert inst.token == 7 and inst.pid == proc.pid and inst.first_ns >= before
    assert inst.last_ns <= time.monotonic_ns()


def test_ticker_fails_on_configured_site(tmp_path: Path) -> None:
    env = {**os.environ, "HARMONY_SITE": "site-b"}
    argv = [sys.executable, str(TICKER), str(tmp_path / "h"), "--fail-on", "site-a,site-b"]
    assert subprocess.run(argv, env=env, check=False, capture_output=True).returncode == 3


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _report(state: str, token: int | None) -> bytes:
    return json.dumps({"app": "x", "state": state, "token": token}).encode()


def test_peer_reports_count_while_their_agent_lives() -> None:
    clock = Clock()
    alive = {"site-b/n1"}
    table = PeerTable("site-a/n1", ttl=2.0, clock=clock, alive=lambda a: a in alive)
    assert table.feed_report("x", "site-b/n1", _report("running", 4))
    assert not table.feed_report("x", "site-a/n1", _report("running", 1))  # ourselves
    (peer,) = table.instances("x")
    assert peer.agent == "site-b/n1" and peer.running and peer.token == 4
    assert table.instances("x", site="site-c") == ()
    alive.clear()  # its session stopped renewing: the report proves nothing any more
    assert table.instances("x") == ()
    table.feed_report("x", "site-b/n1", b"[[[[not json")
    assert table.instances("x") == ()


def test_gossip_counts_for_a_ttl_even_before_sessions_catch_up() -> None:
    clock = Clock()
    table = PeerTable("site-a/n1", ttl=2.0, clock=clock, alive=lambda a: False)
    body = {"agent": "site-c/n1", "instances": [{"app": "x", "state": "running", "token": 9}]}
    agent, apps = table.feed_gossip(json.dumps(body).encode())
    assert agent == "site-c/n1" and apps == {"x"} and table.knows("site-c/n1")
    assert [p.token for p in table.instances("x")] == [9]
    clock.t = 2.5
    assert table.instances("x") == () and not table.knows("site-c/n1")
    assert table.feed_gossip(b'{"agent": 5}') == (None, set())
    assert table.feed_gossip(b"\xff") == (None, set())


def test_state_file_is_private_and_stops_leftovers(tmp_path: Path) -> None:
    sf = StateFile(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        sf.record("ledger", 3, proc.pid, 1.0)
        sf.save()
        assert stat.S_IMODE(sf.path.stat().st_mode) == 0o600
        assert alive(proc.pid, proc_start_time(proc.pid))
        assert not alive(proc.pid, 1)  # a recycled pid has another start time
        said = stop_leftovers(StateFile(tmp_path))
        assert len(said) == 1 and "pid" in said[0]
        assert proc.wait(5) is not None
        assert StateFile(tmp_path).load() == (None, {})
        assert stop_leftovers(StateFile(tmp_path)) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_restarted_agent_waits_for_the_old_fence(tmp_path: Path) -> None:
    """The old fence still terminating its workloads: nothing may start before it exits."""
    sf = StateFile(tmp_path)
    ready = tmp_path / "ready"
    code = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: None); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(0.5)"
    )
    fence = subprocess.Popen([sys.executable, "-c", code, str(ready)], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # poll-with-deadline for the child's handler
        sf.set_fence(fence.pid)
        said = stop_leftovers(StateFile(tmp_path))
        assert said and "fence" in said[0]
        assert fence.poll() is not None, "returned while the old fence still ran"
    finally:
        if fence.poll() is None:
            fence.kill()
        fence.wait()
