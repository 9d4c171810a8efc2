"""``SystemdManager`` for any ``HostShell``: the same commands work locally and over SSH."""

from __future__ import annotations

import posixpath
import re

from topologies.capabilities import CommandResult, HostShell

_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@-]+\.(service|socket|timer|target|path|mount)$")


def check_unit_name(name: str) -> str:
    """Reject names that would escape ``unit_dir`` or that systemd would not load."""
    if not _UNIT_NAME.match(name) or name.startswith("."):
        raise ValueError(f"invalid systemd unit name {name!r}")
    return name


class ShellSystemd:
    """Unit files under ``unit_dir`` and ``systemctl`` found on the host's PATH.

    ``systemctl`` is looked up on the remote PATH on purpose: tests (and exotic hosts) can
    put a shim first on it.
    """

    def __init__(self, shell: HostShell, unit_dir: str, timeout: float) -> None:
        self._shell = shell
        self._unit_dir = unit_dir
        self._timeout = timeout

    @property
    def unit_dir(self) -> str:
        return self._unit_dir

    def _path(self, name: str) -> str:
        return posixpath.join(self._unit_dir, check_unit_name(name))

    async def read_unit(self, name: str) -> str | None:
        data = await self._shell.read_file(self._path(name))
        return None if data is None else data.decode()

    async def install_unit(self, name: str, content: str) -> None:
        await self._shell.write_file(self._path(name), content.encode(), 0o644)

    async def remove_unit(self, name: str) -> None:
        await self._shell.remove_file(self._path(name))

    async def systemctl(self, *args: str) -> CommandResult:
        return await self._shell.run(["systemctl", *args], timeout=self._timeout)

    async def sh(self, script: str, *args: str) -> CommandResult:
        return await self._shell.run(["sh", "-c", script, "sh", *args], timeout=self._timeout)


class SystemdOverShell:
    """Mixin: a host topology provides ``SystemdManager`` by delegating to ``ShellSystemd``
    over its own shell, so localhost and SSH share one implementation."""

    _systemd: ShellSystemd

    @property
    def unit_dir(self) -> str:
        return self._systemd.unit_dir

    async def read_unit(self, name: str) -> str | None:
        return await self._systemd.read_unit(name)

    async def install_unit(self, name: str, content: str) -> None:
        await self._systemd.install_unit(name, content)

    async def remove_unit(self, name: str) -> None:
        await self._systemd.remove_unit(name)

    async def systemctl(self, *args: str) -> CommandResult:
        return await self._systemd.systemctl(*args)

    async def sh(self, script: str, *args: str) -> CommandResult:
        return await self._systemd.sh(script, *args)
