"""Process Score: supervision, environment, stop escalation, process groups, logs."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from scores.base import RunContext, WorkloadState
from scores.guard import RotatingLog
from scores.process import ProcessInterpret
from tests.harness.wait import eventually
from tests.scores.conftest import alive

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
MakeProcess = Callable[..., ProcessInterpret]


async def test_start_observe_stop_is_idempotent(make_process: MakeProcess, ctx: RunContext) -> None:
    proc = make_process(SLEEPER)
    first = await proc.apply(ctx)
    assert first.ok and first.changed, first
    again = await proc.apply(ctx)
    assert again.ok and not again.changed

    seen = await proc.observe()
    assert seen.state is WorkloadState.RUNNING
    pid = seen.pids[0]
    assert alive(pid)
    assert alive(seen.extra["guard_pid"])

    stopped = await proc.stop()
    assert stopped.ok and stopped.changed
    assert not alive(pid)
    assert (await proc.observe()).state is WorkloadState.STOPPED
    assert not (await proc.stop()).changed


async def test_environment_is_contract_plus_spec_only(
    make_process: MakeProcess, ctx: RunContext, monkeypatch: object, tmp_path: Path
) -> None:
    os.environ["HARMONY_AGENT_SECRET"] = "agent-only"
    try:
        out = tmp_path / "env.json"
        code = (
            "import json, os, sys; "
            "json.dump(dict(os.environ), open(sys.argv[1], 'w')); "
            "import time; time.sleep(60)"
        )
        proc = make_process([sys.executable, "-c", code, str(out)], env={"EXTRA": "yes"})
        assert (await proc.apply(ctx)).ok
        env = await eventually(lambda: out.exists() and json.loads(out.read_text() or "null"))
    finally:
        del os.environ["HARMONY_AGENT_SECRET"]
    assert env["HARMONY_APP"] == "ledger"
    assert env["HARMONY_SITE"] == "site-a"
    assert env["HARMONY_NODE"] == "node-1"
    assert env["HARMONY_FENCING_TOKEN"] == "7"
    assert env["EXTRA"] == "yes"
    assert "HARMONY_AGENT_SECRET" not in env


async def test_crashing_workload_is_restarted_with_backoff(
    make_process: MakeProcess, ctx: RunContext, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    proc = make_process(
        ["sh", "-c", f"echo run >> {runs}; exit 3"], backoff_initial="50ms", backoff_max="200ms"
    )
    assert (await proc.apply(ctx)).ok
    await eventually(lambda: runs.exists() and len(runs.read_text().splitlines()) >= 3)
    seen = await proc.observe()
    assert seen.restarts >= 2
    assert (await proc.stop()).ok
    count = len(runs.read_text().splitlines())
    assert (await proc.observe()).state is WorkloadState.STOPPED
    assert len(runs.read_text().splitlines()) == count, "restarted after stop"


async def test_restart_never_reports_the_crash(make_process: MakeProcess, ctx: RunContext) -> None:
    proc = make_process(["sh", "-c", "exit 4"], restart="never")
    assert (await proc.apply(ctx)).ok
    seen = await eventually(lambda: _failed(proc), what="crash to be observed")
    assert seen.reason == "crashed"
    assert "exit 4" in seen.detail
    assert seen.restarts == 0


async def _failed(proc: ProcessInterpret) -> object:
    seen = await proc.observe()
    return seen if seen.state is WorkloadState.FAILED else None


async def test_stop_escalates_to_sigkill_after_stop_timeout(
    make_process: MakeProcess, ctx: RunContext
) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('trap' + 'ped', flush=True); time.sleep(60)"
    )
    proc = make_process([sys.executable, "-c", code], stop_timeout="300ms")
    assert (await proc.apply(ctx)).ok
    log = ctx.workload_dir / "ledger.log"
    # the guard's own note quotes the command, so look for the joined word only it prints
    await eventually(lambda: "\ntrapped\n" in log.read_text(), what="SIGTERM trap")
    pid = (await proc.observe()).pids[0]
    outcome = await proc.stop()
    assert outcome.ok
    assert "SIGKILL" in outcome.message
    assert not alive(pid)
    assert "SIGKILL to process group" in log.read_text()


async def test_stop_reaches_the_whole_process_group(
    make_process: MakeProcess, ctx: RunContext, tmp_path: Path
) -> None:
    child_file = tmp_path / "child.pid"
    proc = make_process(["sh", "-c", f"sleep 60 & echo $! > {child_file}; wait"])
    assert (await proc.apply(ctx)).ok
    child = int(await eventually(lambda: child_file.exists() and child_file.read_text().strip()))
    seen = await eventually(lambda: _with_pid(proc, child), what="child in observed pids")
    assert child in seen.pids
    assert (await proc.stop()).ok
    await eventually(lambda: not alive(child), what="background child to die")


async def _with_pid(proc: ProcessInterpret, pid: int) -> object:
    seen = await proc.observe()
    return seen if pid in seen.pids else None


async def test_spawn_failure_is_an_outcome(make_process: MakeProcess, ctx: RunContext) -> None:
    proc = make_process(["/nonexistent/binary"])
    outcome = await proc.apply(ctx)
    assert not outcome.ok
    assert "cannot start" in outcome.message
    assert (await proc.observe()).state is WorkloadState.FAILED


async def test_expired_deadline_starts_nothing(make_process: MakeProcess, ctx: RunContext) -> None:
    proc = make_process(SLEEPER)
    outcome = await proc.apply(_with_deadline(ctx, time.monotonic() - 1))
    assert not outcome.ok
    assert "deadline" in outcome.message


async def test_deadline_kills_unless_extended(make_process: MakeProcess, ctx: RunContext) -> None:
    extended, fenced = make_process(SLEEPER), make_process(SLEEPER)
    start = time.monotonic()
    assert (await extended.apply(_with_deadline(ctx, start + 0.5))).ok
    assert (await fenced.apply(_with_deadline(ctx, start + 0.5))).ok
    fenced_pid = (await fenced.observe()).pids[0]

    def renew() -> bool:  # the agent's lease renewal, as often as ttl/3
        extended.extend_deadline(time.monotonic() + 0.5)
        return time.monotonic() > start + 1.2

    await eventually(renew, interval=0.1, what="several renewals")
    seen = await fenced.observe()
    assert seen.state is WorkloadState.FAILED and seen.reason == "deadline", seen
    assert not alive(fenced_pid)
    assert (await extended.observe()).state is WorkloadState.RUNNING

    extended.clear_deadline()
    pid = (await extended.observe()).pids[0]
    assert (await extended.stop()).ok
    assert not alive(pid)


def _with_deadline(ctx: RunContext, deadline: float) -> RunContext:
    return RunContext(ctx.app, ctx.site, ctx.node, ctx.fencing_token, ctx.state_dir, deadline)


def test_log_rotation_bounds_each_file(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "app.log", max_bytes=100, backups=2)
    for index in range(30):
        log.write(f"line {index:04d}\n".encode())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["app.log", "app.log.1", "app.log.2"]
    assert all((tmp_path / name).stat().st_size <= 100 for name in files)
    assert "line 0029" in (tmp_path / "app.log").read_text()


def test_signal_names_in_guard_protocol() -> None:
    assert signal.SIGKILL.name == "SIGKILL"
