"""Probes over SSH run on the remote host (a real sshd on loopback, so it is this machine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from scores.health import ProbeSpec
from scores.probes import RemoteExecProbe, RemoteNetProbe, probe_for, probe_program_problem
from tests.harness.ports import free_port
from tests.harness.wait import eventually
from tests.scores.conftest import alive
from tests.topologies.conftest import Sshd
from topologies.ssh import LinuxSshTopology

ENV = {"HARMONY_APP": "ledger", "HARMONY_FENCING_TOKEN": "7", "GREETING": "hello world"}


@pytest.fixture
async def remote(sshd: Sshd) -> AsyncIterator[LinuxSshTopology]:
    topology = LinuxSshTopology(sshd.config())
    yield topology
    await topology.close()


async def test_remote_exec_probe_gets_the_environment(remote: LinuxSshTopology) -> None:
    script = 'test "$HARMONY_APP/$HARMONY_FENCING_TOKEN/$GREETING" = "ledger/7/hello world"'
    probe = probe_for(ProbeSpec(exec=["sh", "-c", script + " && echo fine"]), remote)
    assert isinstance(probe, RemoteExecProbe)
    passed = await probe.check(ENV, 5.0)
    assert (passed.ok, passed.detail) == (True, "exit 0: fine")
    failed = await probe.check({**ENV, "GREETING": "bye"}, 5.0)
    assert (failed.ok, failed.detail) == (False, "exit 1")
    missing = await probe_for(ProbeSpec(exec=["no-such-probe-xyz"]), remote).check(ENV, 5.0)
    assert not missing.ok and missing.detail.startswith("no-such-probe-xyz not found on the host")


async def test_remote_hanging_exec_probe_is_killed_on_the_host(
    remote: LinuxSshTopology, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    probe = probe_for(ProbeSpec(exec=["sh", "-c", f"sleep 60 & echo $$ $! > {pids}; wait"]), remote)
    result = await probe.check(ENV, 0.5)
    assert (result.ok, result.detail) == (False, "timed out after 500ms (killed)")
    shell, child = (int(p) for p in pids.read_text().split())
    await eventually(lambda: not alive(shell) and not alive(child), what="remote probe killed")


@pytest.fixture
async def listener() -> AsyncIterator[str]:
    hang = asyncio.Event()

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def down(_: web.Request) -> web.Response:
        return web.Response(status=500)

    async def stuck(_: web.Request) -> web.Response:
        await hang.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/healthz", ok)
    app.router.add_get("/down", down)
    app.router.add_get("/stuck", stuck)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        hang.set()
        await server.close()


async def test_remote_http_and_tcp_probes_run_on_the_host(
    remote: LinuxSshTopology, listener: str
) -> None:
    async def check(spec: ProbeSpec, timeout: float = 5.0) -> tuple[bool, str]:
        probe = probe_for(spec, remote)
        assert isinstance(probe, RemoteNetProbe)
        result = await probe.check(ENV, timeout)
        return result.ok, result.detail

    assert await check(ProbeSpec(http=f"http://{listener}/healthz")) == (True, "HTTP 200")
    assert await check(ProbeSpec(http=f"http://{listener}/down")) == (False, "HTTP 500")
    slow = await check(ProbeSpec(http=f"http://{listener}/stuck"), 0.5)
    assert not slow[0] and "timed out" in slow[1], slow
    assert await check(ProbeSpec(tcp=listener)) == (True, f"connected to {listener}")
    closed = f"127.0.0.1:{free_port()}"
    assert await check(ProbeSpec(tcp=closed)) == (False, "Connection refused")
    assert await check(ProbeSpec(http=f"http://{closed}/")) == (False, "Connection refused")


async def test_exec_program_is_checked_over_ssh(remote: LinuxSshTopology, sshd: Sshd) -> None:
    assert await probe_program_problem(ProbeSpec(exec=["systemctl", "show"]), remote) is None
    missing = await probe_program_problem(ProbeSpec(exec=["no-such-probe-xyz"]), remote)
    assert missing == f"'no-such-probe-xyz' is not executable on {remote.address}"
    shim = str(sshd.shim_dir / "systemctl")
    assert await probe_program_problem(ProbeSpec(exec=[shim]), remote) is None
    not_exec = str(sshd.shim_dir / "unit_dir")
    assert await probe_program_problem(ProbeSpec(exec=[not_exec]), remote) is not None


async def test_check_runs_the_exec_test_over_ssh(sshd: Sshd) -> None:
    from agent.application import parse_documents
    from agent.cli.check import _check
    from agent.config import AgentConfig

    def app(program: str) -> str:
        return f"""
apiVersion: harmony/v1
kind: Application
metadata: {{name: ledger}}
spec:
  trait: stateful
  placement: {{sites: [site-a]}}
  score: {{kind: SystemdUnit, unit: ledger.service, exec_start: [/usr/bin/sleep, "60"]}}
  health: {{probe: {{exec: [{program}, ledger]}}}}
"""

    config = AgentConfig.model_validate(
        {"site": "site-a", "node": "n1", "topology": sshd.config().model_dump(mode="json")}
    )
    problems, warnings, lines = await _check(parse_documents(app("systemctl")), config)
    assert (problems, warnings) == ([], [])
    assert lines == [
        "application/ledger valid on site-a/n1 (linux-ssh); "
        "deadline enforced outside the agent (transient systemd timer)"
    ]
    address = f"{sshd.user}@127.0.0.1:{sshd.port}"
    problems, _, lines = await _check(parse_documents(app("no-such-probe-xyz")), config)
    assert problems == [
        f"ledger: spec.health.probe.exec: 'no-such-probe-xyz' is not executable on {address}"
    ]
    assert lines == []
    down = AgentConfig.model_validate(
        {
            "site": "site-a",
            "node": "n1",
            "topology": sshd.config(port=free_port()).model_dump(mode="json"),
        }
    )
    problems, warnings, _ = await _check(parse_documents(app("systemctl")), down)
    assert problems == []
    assert len(warnings) == 1 and "could not check 'systemctl'" in warnings[0]
