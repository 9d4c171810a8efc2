"""Localhost topology, builders, higher-order composition and declared capabilities."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from topologies.base import Topology
from topologies.build import build_topology, capabilities_of
from topologies.capabilities import HostShell, KubernetesApi, ProcessRuntime, SystemdManager
from topologies.config import KubernetesConfig, LinuxSshConfig, LocalhostConfig
from topologies.higher_order import FailoverTopology, MultisiteTopology, resolve
from topologies.k8s import KubernetesTopology
from topologies.localhost import LocalhostTopology
from topologies.ssh import LinuxSshTopology


def test_declared_capabilities_are_structurally_true() -> None:
    topologies: list[Topology] = [
        LocalhostTopology(),
        KubernetesTopology("https://k8s.invalid"),
        LinuxSshTopology(LinuxSshConfig(kind="linux-ssh", host="db1")),
    ]
    for topology in topologies:
        assert isinstance(topology, Topology)
        for capability in topology.capabilities():
            assert isinstance(topology, capability), (topology.kind, capability)
    assert KubernetesApi not in LocalhostTopology().capabilities()


def test_build_topology_from_config(tmp_path: Path) -> None:
    local = build_topology(LocalhostConfig(unit_dir=str(tmp_path)))
    assert isinstance(local, LocalhostTopology) and local.unit_dir == str(tmp_path)
    ssh = build_topology(LinuxSshConfig(kind="linux-ssh", host="db1", port=2222))
    assert isinstance(ssh, LinuxSshTopology) and ssh.address == "root@db1:2222"
    assert capabilities_of(KubernetesConfig(kind="kubernetes")) == {KubernetesApi}


async def test_localhost_runs_commands_as_values() -> None:
    local = LocalhostTopology()
    ok = await local.run([sys.executable, "-c", "import sys; print(sys.stdin.read())"], input=b"hi")
    assert (ok.returncode, ok.stdout) == (0, "hi\n")
    missing = await local.run(["/nonexistent/tool"])
    assert missing.returncode == 127
    slow = await local.run(["sleep", "10"], timeout=0.2)
    assert slow.returncode == 124
    failing = await local.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert (failing.returncode, failing.stderr) == (3, "oops\n")


async def test_localhost_writes_files_atomically(tmp_path: Path) -> None:
    local = LocalhostTopology()
    target = tmp_path / "sub" / "unit.service"
    assert await local.read_file(str(target)) is None
    await local.write_file(str(target), b"[Unit]\n", 0o600)
    assert await local.read_file(str(target)) == b"[Unit]\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert os.listdir(target.parent) == ["unit.service"]
    await local.remove_file(str(target))
    await local.remove_file(str(target))  # idempotent
    assert not target.exists()


def test_failover_acts_through_the_active_member() -> None:
    primary, replica = LocalhostTopology(), LocalhostTopology()
    pair = FailoverTopology(primary, replica)
    assert resolve(pair) is primary
    pair.fail_over()
    assert resolve(pair) is replica
    nested = MultisiteTopology({"a": pair, "b": FailoverTopology(replica, primary)}, local="a")
    assert resolve(nested) is replica
    assert nested.capabilities() == {ProcessRuntime, HostShell, SystemdManager}


def test_higher_order_members_must_be_topologies() -> None:
    with pytest.raises(TypeError):
        FailoverTopology(LocalhostTopology(), object())
    with pytest.raises(ValueError, match="local site"):
        MultisiteTopology({"a": LocalhostTopology()}, local="b")
