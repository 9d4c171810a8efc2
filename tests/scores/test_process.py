"""Process Score under the fence: supervision, environment, stop escalation, process groups,
deadlines, users, logs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh.clock import boottime
from scores.base import Deadline, RunContext, WorkloadState
from scores.process import ProcessInterpret
from tests.harness.wait import eventually
from tests.scores.conftest import alive
from topologies.localhost import LocalhostTopology

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
MakeProcess = Callable[..., ProcessInterpret]


def with_deadline(ctx: RunContext, deadline: Deadline | None) -> RunContext:
    return RunContext(ctx.app, ctx.site, ctx.node, ctx.fencing_token, ctx.state_dir, deadline)


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

    stopped = await proc.stop()
    assert stopped.ok and stopped.changed
    assert not alive(pid)
    assert (await proc.observe()).state is WorkloadState.STOPPED
    assert not (await proc.stop()).changed


async def test_environment_is_contract_plus_spec_only(
    make_process: MakeProcess, ctx: RunContext, localhost: LocalhostTopology, tmp_path: Path
) -> None:
    os.environ["HARMONY_AGENT_SECRET"] = "agent-only"
    try:
        out = tmp_path / "env.json"
        code = (
            "import json, os, sys; "
            "json.dump(dict(os.environ), open(sys.argv[1], 'w')); "
            "import time; time.sleep(60)"
        )
        proc = make_process(
            [sys.executable, "-c", code, str(out)],
            env={"EXTRA": "yes", "LD_PRELOAD": "/nonexistent/libevil.so"},
        )
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
    # spec.env reaches the workload only, never the fence that enforces its deadline
    assert localhost.fence.proc is not None
    fence_env = await asyncio.to_thread(
        Path(f"/proc/{localhost.fence.proc.pid}/environ").read_bytes
    )
    assert b"LD_PRELOAD" not in fence_env


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
        "print('trapped', flush=True); time.sleep(60)"
    )
    proc = make_process([sys.executable, "-c", code], stop_timeout="300ms")
    assert (await proc.apply(ctx)).ok
    log = ctx.workload_dir / "ledger.log"
    await eventually(lambda: "trapped" in log.read_text(), what="SIGTERM trap")
    pid = (await proc.observe()).pids[0]
    outcome = await proc.stop()
    assert outcome.ok and "SIGKILL" in outcome.message
    assert not alive(pid)


async def test_stop_reaches_the_whole_process_group(
    make_process: MakeProcess, ctx: RunContext, tmp_path: Path
) -> None:
    child_file = tmp_path / "child.pid"
    proc = make_process(["sh", "-c", f"sleep 60 & echo $! > {child_file}; wait"])
    assert (await proc.apply(ctx)).ok
    child = int(await eventually(lambda: child_file.exists() and child_file.read_text().strip()))
    assert alive(child)
    assert (await proc.stop()).ok
    await eventually(lambda: not alive(child), what="background child to die")


async def test_spawn_failure_is_an_outcome(make_process: MakeProcess, ctx: RunContext) -> None:
    proc = make_process(["/nonexistent/binary"])
    outcome = await proc.apply(ctx)
    assert not outcome.ok
    assert "cannot start" in outcome.message and "/nonexistent/binary" in outcome.message
    assert (await proc.observe()).state is WorkloadState.FAILED


async def test_expired_deadline_starts_nothing(make_process: MakeProcess, ctx: RunContext) -> None:
    proc = make_process(SLEEPER)
    outcome = await proc.apply(with_deadline(ctx, Deadline(boottime() - 1)))
    assert not outcome.ok
    assert "deadline" in outcome.message


async def test_a_fixed_deadline_kills_the_whole_group_unless_moved(
    make_process: MakeProcess, ctx: RunContext, tmp_path: Path
) -> None:
    child_file = tmp_path / "child.pid"
    moved = make_process(SLEEPER)
    fenced = make_process(["sh", "-c", f"sleep 60 & echo $! > {child_file}; wait"])
    start = boottime()
    other = RunContext("other", ctx.site, ctx.node, 8, ctx.state_dir, Deadline(start + 0.5))
    assert (await moved.apply(with_deadline(ctx, Deadline(start + 0.5)))).ok
    assert (await fenced.apply(other)).ok
    child = int(await eventually(lambda: child_file.exists() and child_file.read_text().strip()))

    def renew() -> bool:  # the agent's renewals, as often as ttl/3
        moved.set_deadline(Deadline(boottime() + 0.5))
        return boottime() > start + 1.2

    await eventually(renew, interval=0.1, what="several renewals")
    seen = await fenced.observe()
    assert seen.state is WorkloadState.FAILED and seen.reason == "deadline", seen
    assert not alive(child), "a grandchild outlived the deadline"
    assert (await moved.observe()).state is WorkloadState.RUNNING
    moved.set_deadline(None)  # SplitBrainAllowed: no deadline any more
    pid = (await moved.observe()).pids[0]
    assert (await moved.stop()).ok
    assert not alive(pid)


async def test_following_the_session_needs_no_main_loop(
    make_process: MakeProcess, ctx: RunContext, localhost: LocalhostTopology
) -> None:
    """The session thread feeds the fence directly: while it does, the workload lives;
    when it stops, the workload dies at the last deadline it sent."""
    proc = make_process(SLEEPER)
    localhost.fence.session_deadline(boottime() + 0.5)
    assert (await proc.apply(with_deadline(ctx, Deadline(0.0, follows_session=True)))).ok

    def renew() -> bool:
        localhost.fence.session_deadline(boottime() + 0.5)
        return boottime() > ctx_start + 1.0

    ctx_start = boottime()
    await eventually(renew, interval=0.1, what="renewals through the session pipe")
    assert (await proc.observe()).state is WorkloadState.RUNNING
    last = boottime() + 0.3
    localhost.fence.session_deadline(last)  # the last renewal; then silence
    seen = await eventually(lambda: _failed(proc), timeout=5, what="killed at the deadline")
    assert seen.reason == "deadline" and boottime() >= last


async def test_a_lease_claimed_in_fewer_stores_follows_its_support_without_the_main_loop(
    make_process: MakeProcess, ctx: RunContext, localhost: LocalhostTopology
) -> None:
    """A lease that does not follow the anchored session (claimed in two stores of three
    until repaired) used to get a fixed deadline pushed by the main loop on each renewal;
    a busy loop then let the fence kill it (seen in CI). Now the fence follows the claim
    support's deadline as the session thread writes it, with no main loop involved."""
    support = (("n2", "e2"), ("n3", "e3"))
    fence = localhost.fence
    fence.session_deadline(float("-inf"))  # the anchored session does not cover it
    proc = make_process(SLEEPER)
    start = boottime()
    assert (await proc.apply(with_deadline(ctx, Deadline(start + 0.5, support=support)))).ok
    assert list(fence.groups().values()) == [support]

    def renew() -> bool:  # what the session thread does after each renewal (agent/daemon.py)
        fence.session_deadline(float("-inf"), {g: boottime() + 0.5 for g in fence.groups()})
        return boottime() > start + 1.5

    await eventually(renew, timeout=10, interval=0.1, what="renewals through the session pipe")
    assert (await proc.observe()).state is WorkloadState.RUNNING
    last = boottime() + 0.3
    fence.session_deadline(float("-inf"), {g: last for g in fence.groups()})
    seen = await eventually(lambda: _failed(proc), timeout=5, what="killed at the deadline")
    assert seen.reason == "deadline" and boottime() >= last
    assert fence.groups() == {}, "the support of an exited workload is still followed"


@pytest.mark.skipif(os.geteuid() != 0, reason="running a workload as another user needs root")
async def test_workloads_run_as_the_configured_user_and_cannot_read_agent_secrets(
    ctx: RunContext,
) -> None:
    import contextlib
    import shutil
    import tempfile

    from scores.process import ProcessSpec

    shared = Path(tempfile.mkdtemp(prefix="harmony-runas-", dir="/tmp"))
    secret = shared / "ca.key"  # like the agent's keys: root-owned, 0600

    def prepare() -> None:
        shared.chmod(0o755)
        (shared / "out").mkdir(mode=0o777)
        (shared / "out").chmod(0o777)
        secret.write_text("private")
        secret.chmod(0o600)

    await asyncio.to_thread(prepare)
    topology = LocalhostTopology(run_as=(65534, 65534))
    task = asyncio.create_task(topology.fence.run())
    await asyncio.wait_for(topology.fence.started.wait(), 15)
    try:
        result = shared / "out" / "r"
        script = (
            f"id -u > {result}.tmp; cat {secret} >> {result}.tmp 2>&1; mv {result}.tmp {result}"
        )
        spec = ProcessSpec(command=["sh", "-c", f"{script}; exec sleep 60"])
        proc = spec.interpret(topology)
        assert (await proc.apply(ctx)).ok, await proc.observe()
        text = await eventually(lambda: result.exists() and result.read_text())
        uid, rest = text.split("\n", 1)
        assert uid == "65534" and "Permission denied" in rest and "private" not in rest
        await proc.stop()
    finally:
        await topology.fence.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        shutil.rmtree(shared, ignore_errors=True)


UNPRIVILEGED_AGENT = """
import asyncio, sys
from pathlib import Path
from scores.base import RunContext
from scores.process import ProcessSpec
from topologies.localhost import LocalhostTopology

async def main(out: str) -> None:
    topology = LocalhostTopology(run_as=(65533, 65533))
    task = asyncio.create_task(topology.fence.run())
    await asyncio.wait_for(topology.fence.started.wait(), 15)
    topology.fence.session_deadline(float("inf"))
    ctx = RunContext(app="caps", site="site-a", node="n", fencing_token=1, state_dir=Path(out))
    spec = ProcessSpec(command=["sh", "-c", f"grep ^Cap /proc/self/status > {out}/caps.tmp; "
                                f"id -G >> {out}/caps.tmp; mv {out}/caps.tmp {out}/caps"])
    proc = spec.interpret(topology)
    assert (await proc.apply(ctx)).ok
    for _ in range(200):
        if (Path(out) / "caps").exists():
            break
        await asyncio.sleep(0.05)
    await topology.fence.close()
    task.cancel()

asyncio.run(main(sys.argv[1]))
"""


def _reachable_by_others(path: str) -> bool:
    """Every directory on the interpreter's path, as invoked (a venv in the checkout) and
    resolved (the base Python), is searchable by other users."""
    dirs = [*Path(path).absolute().parents, *Path(os.path.realpath(path)).parents]
    return all(p.stat().st_mode & 0o001 for p in dirs)


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(),
    reason="needs root and setpriv to play an unprivileged agent with ambient capabilities",
)
@pytest.mark.skipif(
    not _reachable_by_others(sys.executable),
    reason="this Python (or its venv) lives where an unprivileged user cannot run it "
    "(e.g. under /root or a 0700 mktemp directory)",
)
def test_workloads_of_an_unprivileged_agent_inherit_no_capabilities() -> None:
    """The systemd unit runs the agent as its own user with ambient CAP_SETUID/SETGID/KILL
    (deploy/systemd): a workload it runs as another user must get none of them, nor the
    agent's supplementary groups."""
    import shutil
    import subprocess
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="harmony-caps-", dir="/tmp"))
    tmp_path.chmod(0o777)
    script = tmp_path / "agent.py"
    script.write_text(UNPRIVILEGED_AGENT)
    script.chmod(0o644)
    caps = "+setuid,+setgid,+kill"
    subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--groups=65534,4",
            f"--inh-caps={caps}",
            f"--ambient-caps={caps}",
            sys.executable,
            str(script),
            str(tmp_path),
        ],
        check=True,
        timeout=60,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    lines = dict(
        line.split(":\t") for line in (tmp_path / "caps").read_text().splitlines() if ":" in line
    )
    groups = (tmp_path / "caps").read_text().splitlines()[-1].split()
    assert int(lines["CapAmb"], 16) == 0, lines
    assert int(lines["CapEff"], 16) == 0 and int(lines["CapPrm"], 16) == 0, lines
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert groups == ["65533"], groups


async def test_logs_are_rotated_by_copy_and_truncate(
    make_process: MakeProcess, ctx: RunContext
) -> None:
    code = (
        "import sys, time\nfor i in range(400):\n    print(f'line {i:04d}', flush=True)\n"
        "time.sleep(60)"
    )
    proc = make_process([sys.executable, "-c", code], log_max_bytes=1024, log_backups=2)
    assert (await proc.apply(ctx)).ok
    log = ctx.workload_dir / "ledger.log"
    rotated = ctx.workload_dir / "ledger.log.1"
    await eventually(rotated.exists, timeout=10, what="a rotated log file")
    assert "line 0399" in log.read_text() + rotated.read_text()
