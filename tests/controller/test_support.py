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
from agent.controller.statefile import Recorded, StateFile, alive, proc_start_time, stop_leftovers
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


def _beat(agent: str, *insts: tuple[str, str, int | None], state: str = "alive") -> bytes:
    return json.dumps(
        {
            "agent": agent,
            "site": agent.split("/", maxsplit=1)[0],
            "state": state,
            "instances": [{"app": a, "state": s, "token": t} for a, s, t in insts],
        }
    ).encode()


def test_peer_table_freshness_and_latest_source() -> None:
    clock = Clock()
    table = PeerTable("site-a/n1", ttl=2.0, clock=clock)
    assert table.feed("agent.site-b.n1", _beat("site-b/n1", ("x", "running", 4))) == {"x"}
    table.feed("agent.site-a.n1", _beat("site-a/n1", ("x", "running", 1)))  # ourselves
    (peer,) = table.instances("x")
    assert peer.agent == "site-b/n1" and peer.running and peer.token == 4
    clock.t = 1.0
    # A newer report from the core subject says it stopped: the latest source wins.
    table.feed("core:harmony.instances.site-b.n1", _beat("site-b/n1", ("x", "standby", None)))
    (peer,) = table.instances("x")
    assert not peer.running
    assert table.instances("x", site="site-c") == ()
    assert table.live_agents("site-b") == ["site-b/n1"]
    clock.t = 3.5  # neither report renewed within a ttl: stale
    assert table.instances("x") == ()
    table.feed("agent.site-c.n1", _beat("site-c/n1", ("x", "running", 9), state="closed"))
    assert table.instances("x") == ()
    assert table.feed("agent.site-c.n1", None) == {"x"}
    assert table.feed("agent.bad", b"not json") == set()


def test_state_file_is_private_and_stops_leftovers(tmp_path: Path) -> None:
    sf = StateFile(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        sf.record(
            Recorded(
                app="ledger",
                token=3,
                pid=proc.pid,
                pid_start=proc_start_time(proc.pid),
                guard_pid=None,
                guard_start=None,
                stop_timeout=1.0,
            )
        )
        assert stat.S_IMODE(sf.path.stat().st_mode) == 0o600
        assert alive(proc.pid, proc_start_time(proc.pid))
        assert not alive(proc.pid, 1)  # a recycled pid has another start time
        said = stop_leftovers(sf)
        assert len(said) == 1 and "pid" in said[0]
        assert proc.wait(5) is not None
        assert sf.load() == {}
        assert stop_leftovers(sf) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
