"""LinuxSshTopology against a real OpenSSH sshd on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.topologies.conftest import Sshd
from topologies.build import build_topology
from topologies.capabilities import HostShell, RemoteShell, SystemdManager
from topologies.ssh import LinuxSshTopology


@pytest.fixture
async def remote(sshd: Sshd) -> AsyncIterator[LinuxSshTopology]:
    topology = build_topology(sshd.config())
    assert isinstance(topology, LinuxSshTopology)
    yield topology
    await topology.close()


async def test_runs_commands_and_reuses_one_connection(remote: LinuxSshTopology) -> None:
    result = await remote.run(["sh", "-c", 'echo "$1 world"', "sh", "hello; rm -rf /"])
    assert result.ok
    assert result.stdout == "hello; rm -rf / world\n"
    first = await remote.connection()
    failing = await remote.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert (failing.returncode, failing.stderr) == (3, "oops\n")
    assert await remote.connection() is first


async def test_remote_path_finds_the_systemctl_shim(remote: LinuxSshTopology, sshd: Sshd) -> None:
    result = await remote.run(["sh", "-c", "command -v systemctl"])
    assert result.stdout.strip() == str(sshd.shim_dir / "systemctl")


async def test_files_are_written_atomically_and_read_back(
    remote: LinuxSshTopology, tmp_path: Path
) -> None:
    target = tmp_path / "remote" / "file.txt"
    target.parent.mkdir()
    assert await remote.read_file(str(target)) is None
    await remote.write_file(str(target), b"one\ntwo\n", 0o640)
    assert await remote.read_file(str(target)) == b"one\ntwo\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert list(target.parent.iterdir()) == [target], "temporary file left behind"
    await remote.remove_file(str(target))
    assert not target.exists()


async def test_command_timeout_is_a_result(remote: LinuxSshTopology) -> None:
    result = await remote.run(["sleep", "10"], timeout=0.3)
    assert result.returncode == 124
    assert "timed out" in result.stderr


async def test_unknown_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    topology = LinuxSshTopology(sshd.config(known_hosts=empty))
    try:
        result = await topology.run(["true"])
        assert result.returncode == 255
        assert "not trusted" in result.stderr.lower() or "host key" in result.stderr.lower()
        with pytest.raises(OSError):
            await topology.read_file("/etc/hostname")
    finally:
        await topology.close()


async def test_unreachable_host_is_a_result(sshd: Sshd) -> None:
    from tests.harness.ports import free_port

    topology = LinuxSshTopology(sshd.config(port=free_port()))
    result = await topology.run(["true"])
    assert result.returncode == 255
    assert "127.0.0.1" in result.stderr


def test_declares_what_it_implements(remote: LinuxSshTopology) -> None:
    assert remote.capabilities() == {RemoteShell, HostShell, SystemdManager}
    for capability in remote.capabilities():
        assert isinstance(remote, capability)
