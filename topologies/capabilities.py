"""Capabilities: what a Topology can do, as structural ``Protocol`` types.

A Score names the capabilities it needs; a Topology provides them by having the methods
(no registration, no inheritance), so mypy proves statically that a Score's Interpret is
only ever handed a Topology able to run it. ``Topology.capabilities()`` reports the same
set at runtime, because a Score read from YAML is only known at runtime.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from topologies.supervisor import Exit, Launch, Support


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Outcome of a command on a host; a non-zero exit is a value, not an exception."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def summary(self) -> str:
        """One line for logs and Outcomes: the command, its exit code and its last words."""
        tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-1:] or [""]
        return f"{' '.join(self.argv)} exited {self.returncode}: {tail[0]}".rstrip(": ")


@runtime_checkable
class HostShell(Protocol):
    """Run commands and write files on the topology's host (local or remote)."""

    async def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> CommandResult: ...

    async def read_file(self, path: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        ...

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Replace the file atomically, so a reader never sees half a unit file."""
        ...

    async def remove_file(self, path: str) -> None: ...


@runtime_checkable
class RemoteShell(HostShell, Protocol):
    """A HostShell on another machine: commands cross a network and may time out."""

    @property
    def address(self) -> str:
        """``user@host:port``, for messages."""
        ...


@runtime_checkable
class ProcessRuntime(Protocol):
    """Run workloads on the agent's own machine under its fence (``topologies/fence.py``).

    The fence is a process outside the agent's event loop: it owns every workload, kills a
    workload's whole process group at its deadline even while the agent is hung or paused,
    and terminates everything when the agent dies. Workloads run as ``run_as`` (a user other
    than the agent's, so they cannot read its keys), never with the agent's environment.
    """

    @property
    def run_as(self) -> tuple[int | None, int | None]:
        """(uid, gid) workloads run as; (None, None): the agent's own."""
        ...

    async def launch(self, launch: Launch) -> tuple[int, asyncio.Future[Exit]]:
        """Start a workload; its pid, and a future that resolves when it exits.

        Raises LaunchError (one line) when it cannot start."""
        ...

    def stop_workload(self, wid: str) -> None:
        """SIGTERM the workload's process group, SIGKILL after its stop_timeout."""
        ...

    def kill_workload(self, wid: str) -> None: ...

    def set_deadline(
        self,
        wid: str,
        mode: str,
        deadline: float | None = None,
        support: Support = (),
    ) -> None:
        """``follow`` the session deadline (or, with ``support``, that claim's validity as
        the session thread computes it), a ``fixed`` one (CLOCK_BOOTTIME), or ``none``;
        ``deadline`` is also the bound a follower starts from."""
        ...


@runtime_checkable
class SystemdManager(Protocol):
    """Install unit files and drive ``systemctl`` on the topology's host."""

    @property
    def unit_dir(self) -> str: ...

    async def read_unit(self, name: str) -> str | None: ...

    async def install_unit(self, name: str, content: str) -> None: ...

    async def remove_unit(self, name: str) -> None: ...

    async def systemctl(self, *args: str) -> CommandResult: ...

    async def sh(self, script: str, *args: str) -> CommandResult:
        """``sh -c script sh args...`` on the systemd host: for systemctl and systemd-run
        calls that must run together, in one process independent of the agent."""
        ...


@runtime_checkable
class KubernetesApi(Protocol):
    """A Kubernetes API server: server-side apply, read, patch and delete any object."""

    @property
    def namespace(self) -> str:
        """Namespace used for namespaced objects that do not name one."""
        ...

    async def apply(
        self, manifest: Mapping[str, Any], *, field_manager: str, force: bool = True
    ) -> dict[str, Any]: ...

    async def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None: ...

    async def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """JSON merge patch (RFC 7386), e.g. of the ``scale`` subresource."""
        ...

    async def delete(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> bool: ...

    async def list(
        self,
        api_version: str,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """The objects of ``kind`` in the namespace, filtered by a label selector."""
        ...


ALL_CAPABILITIES: tuple[type, ...] = (
    HostShell,
    RemoteShell,
    ProcessRuntime,
    SystemdManager,
    KubernetesApi,
)
"""Every capability this package defines, in the order messages list them."""


def capability_name(capability: type) -> str:
    return capability.__name__
