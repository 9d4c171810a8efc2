"""Probes against real processes and real listeners on this machine; the health monitor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from scores.base import Observation, RunContext, WorkloadState
from scores.health import HealthSpec, Phase, ProbeSpec, Verdict
from scores.probes import (
    HealthMonitor,
    LocalExecProbe,
    LocalHttpProbe,
    LocalTcpProbe,
    ProbeUnsupported,
    health_monitor,
    probe_for,
    probe_program_problem,
)
from scores.process import ProcessSpec
from scores.systemd import SystemdUnitSpec
from tests.harness.ports import free_port
from tests.harness.wait import eventually
from tests.scores.conftest import alive
from topologies.higher_order import FailoverTopology
from topologies.k8s import KubernetesTopology
from topologies.localhost import LocalhostTopology

ENV = {"HARMONY_APP": "ledger", "HARMONY_FENCING_TOKEN": "7", "MODE": "primary"}


def _exec(*argv: str) -> LocalExecProbe:
    probe = probe_for(ProbeSpec(exec=list(argv)), LocalhostTopology())
    assert isinstance(probe, LocalExecProbe)
    return probe


async def test_exec_probe_runs_with_the_workload_environment() -> None:
    script = 'test "$HARMONY_APP/$HARMONY_FENCING_TOKEN/$MODE" = ledger/7/primary && echo fine'
    passed = await _exec("sh", "-c", script).check(ENV, 5.0)
    assert passed.ok and passed.detail == "exit 0: fine", passed
    failed = await _exec("sh", "-c", script).check({**ENV, "MODE": "replica"}, 5.0)
    assert not failed.ok and failed.detail == "exit 1"


@pytest.mark.skipif(os.geteuid() != 0, reason="running a probe as another user needs root")
async def test_exec_probe_runs_as_the_workloads_user() -> None:
    nobody = LocalhostTopology(run_as=(65534, 65534))
    probe = probe_for(ProbeSpec(exec=["sh", "-c", "echo $(id -u):$(id -g):$(id -G)"]), nobody)
    result = await probe.check(ENV, 5.0)
    assert (result.ok, result.detail) == (True, "exit 0: 65534:65534:65534")


async def test_exec_probe_failure_carries_the_last_line_of_output() -> None:
    result = await _exec("sh", "-c", "echo checking; echo connection refused >&2; exit 3").check(
        ENV, 5.0
    )
    assert (result.ok, result.detail, result.source) == (
        False,
        "exit 3: connection refused",
        "probe exec",
    )
    missing = await _exec("/nonexistent/probe").check(ENV, 5.0)
    assert not missing.ok and missing.detail.startswith("cannot run /nonexistent/probe:")


async def test_hanging_exec_probe_fails_and_its_processes_are_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 600 & echo $$ $! > {pids}; wait"
    # The bound only turns a probe that never returns into a failure instead of a hang.
    result = await asyncio.wait_for(_exec("sh", "-c", script).check(ENV, 0.5), 30)
    assert not result.ok and result.detail == "timed out after 500ms (killed)", result
    shell, child = (int(p) for p in pids.read_text().split())
    await eventually(lambda: not alive(shell) and not alive(child), what="probe group killed")


@pytest.fixture
async def http_server() -> AsyncIterator[str]:
    hang = asyncio.Event()

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound("/nowhere-that-exists")

    async def down(_: web.Request) -> web.Response:
        return web.Response(status=503, text="warming up")

    async def stuck(_: web.Request) -> web.Response:
        await hang.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/healthz", ok)
    app.router.add_get("/moved", moved)
    app.router.add_get("/down", down)
    app.router.add_get("/stuck", stuck)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        hang.set()
        await server.close()


async def test_http_probe_against_a_real_listener(http_server: str) -> None:
    async def check(path: str, timeout: float = 5.0) -> tuple[bool, str]:
        probe = probe_for(ProbeSpec(http=http_server + path), LocalhostTopology())
        assert isinstance(probe, LocalHttpProbe)
        try:
            result = await probe.check(ENV, timeout)
        finally:
            await probe.close()
        return result.ok, result.detail

    assert await check("/healthz") == (True, "HTTP 200")
    assert await check("/moved") == (True, "HTTP 302"), "3xx passes and is not followed"
    assert await check("/down") == (False, "HTTP 503")
    assert await check("/stuck", 0.3) == (False, "timed out after 300ms")
    refused = probe_for(ProbeSpec(http=f"http://127.0.0.1:{free_port()}/"), LocalhostTopology())
    result = await refused.check(ENV, 5.0)
    await refused.close()
    assert (result.ok, result.detail) == (False, "connection refused")


async def test_tcp_probe_against_a_real_listener() -> None:
    accepted = asyncio.Event()

    def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        probe = probe_for(ProbeSpec(tcp=f"127.0.0.1:{port}"), LocalhostTopology())
        assert isinstance(probe, LocalTcpProbe)
        result = await probe.check(ENV, 5.0)
        assert result.ok and result.detail == f"connected to 127.0.0.1:{port}"
        await asyncio.wait_for(accepted.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()
    closed = await probe.check(ENV, 5.0)
    assert (closed.ok, closed.detail) == (False, "connection refused")


async def test_tcp_probe_against_a_listener_that_never_accepts_times_out() -> None:
    """A backlog of 0, full: the kernel drops further SYNs, so the connect hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    probe = LocalTcpProbe(f"127.0.0.1:{port}")
    try:
        for _ in range(8):  # fill the accept queue; later connects hang
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        result = await asyncio.wait_for(probe.check(ENV, 0.3), 30)
        assert (result.ok, result.detail) == (False, "timed out after 300ms")
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_probes_pick_the_topology_that_acts() -> None:
    pair = FailoverTopology(LocalhostTopology(), LocalhostTopology())
    assert isinstance(probe_for(ProbeSpec(exec=["true"]), pair), LocalExecProbe)
    with pytest.raises(ProbeUnsupported, match="probe tcp cannot run on the kubernetes topology"):
        probe_for(ProbeSpec(tcp="127.0.0.1:1"), KubernetesTopology("https://k8s.invalid"))


async def test_exec_program_is_checked_on_the_host(tmp_path: Path) -> None:
    local = LocalhostTopology()
    assert await probe_program_problem(ProbeSpec(exec=["sh", "-c", "true"]), local) is None
    missing = await probe_program_problem(ProbeSpec(exec=["no-such-probe-xyz"]), local)
    assert missing == "'no-such-probe-xyz' is not an executable file on this host"
    plain = tmp_path / "probe.sh"
    plain.write_text("#!/bin/sh\nexit 0\n")
    assert await probe_program_problem(ProbeSpec(exec=[str(plain)]), local) is not None
    plain.chmod(0o755)
    assert await probe_program_problem(ProbeSpec(exec=[str(plain)]), local) is None
    assert await probe_program_problem(ProbeSpec(tcp="127.0.0.1:1"), local) is None


async def _crossed(monitor: HealthMonitor) -> Verdict:
    """The verdict once the threshold is crossed (failures only grow while failing)."""
    await eventually(lambda: monitor.verdict().crossed, what="threshold crossed")
    return monitor.verdict()


def _ctx(tmp_path: Path) -> RunContext:
    return RunContext("ledger", "site-a", "node-1", 7, tmp_path)


async def test_monitor_gives_up_after_threshold_then_recovers_in_cooldown(tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    health = HealthSpec(
        probe=ProbeSpec(
            exec=["sh", "-c", f'test -f {healthy} || {{ echo "no {healthy.name}"; exit 1; }}']
        ),
        period=0.5,
        timeout=0.5,
        failure_threshold=3,
        start_period=0,
        cooldown=3600,
    )
    spec = ProcessSpec(command=["sleep", "60"], env={"MODE": "primary"})
    monitor = health_monitor("ledger", health, spec, LocalhostTopology())
    woken = asyncio.Event()
    monitor.watch(woken.set)
    try:
        assert monitor.probe is not None and monitor.probe.kind == "exec"
        monitor.started(_ctx(tmp_path))
        await asyncio.wait_for(woken.wait(), 30)  # the controller is woken, not polling
        woken.clear()
        verdict = await _crossed(monitor)
        assert re.fullmatch(
            r"ledger: probe exec failed \d+ times in a row \(threshold 3\): exit 1: no healthy",
            verdict.sentence,
        ), verdict.sentence
        assert monitor.give_up(default_cooldown=1.0) == 3600
        assert monitor.verdict().phase is Phase.COOLING
        checks = monitor.checks
        await eventually(lambda: monitor.checks > checks + 1, what="probing while cooling")
        assert monitor.verdict().phase is Phase.COOLING and not monitor.take_recovery()
        assert not woken.is_set(), "no wake-up while still failing"
        healthy.touch()
        await asyncio.wait_for(woken.wait(), 30)
        assert monitor.take_recovery()
        assert monitor.verdict().phase is Phase.IDLE
    finally:
        await monitor.close()


async def test_monitor_counts_builtin_health_without_a_probe(tmp_path: Path) -> None:
    unit = SystemdUnitSpec(unit="ledger.service", exec_start=["/bin/true"])
    monitor = health_monitor(
        "ledger", HealthSpec(period=0.05, timeout=0.05, start_period=0), unit, LocalhostTopology()
    )
    try:
        assert monitor.probe is None
        monitor.started(_ctx(tmp_path))
        monitor.note(Observation(WorkloadState.RUNNING, "ledger.service: active/running"))
        await eventually(lambda: monitor.checks >= 1, what="the first check")
        assert not monitor.verdict().failures
        # Healthy and nothing to probe: no check until the next observation (a thousand
        # applications each checked every period cost an idle agent most of its CPU).
        quiet_from, began = monitor.checks, time.monotonic()
        await eventually(lambda: time.monotonic() - began > 0.5, what="ten periods")
        assert monitor.checks <= quiet_from + 1, "checked every period with nothing to check"
        monitor.note(
            Observation(WorkloadState.FAILED, "ledger.service: failed/failed", reason="failed")
        )
        verdict = await _crossed(monitor)
        assert re.fullmatch(
            r"ledger: built-in health failed \d+ times in a row \(threshold 3\): "
            r"ledger\.service: failed/failed",
            verdict.sentence,
        ), verdict.sentence
        monitor.stopped()
        assert monitor.verdict().phase is Phase.IDLE and not monitor.verdict().failures
    finally:
        await monitor.close()


async def test_monitor_survives_a_probe_that_raises(tmp_path: Path) -> None:
    class Broken:
        kind = "exec"
        target = "broken"

        async def check(self, env: object, timeout: float) -> object:
            raise RuntimeError("boom")

        async def close(self) -> None:
            return None

    monitor = HealthMonitor("ledger", HealthSpec(start_period=0), Broken())  # type: ignore[arg-type]
    monitor.tracker.started()
    verdict = await monitor.check_once()
    assert verdict.failures == 1 and "probe error: RuntimeError('boom')" in verdict.sentence
    await monitor.close()
