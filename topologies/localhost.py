"""The agent's own machine: processes it can supervise, its shell and its systemd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from topologies.capabilities import (
    CommandResult,
    HostShell,
    ProcessRuntime,
    SystemdManager,
)
from topologies.supervisor import Exit, FenceSupervisor, Launch, Support
from topologies.systemd import ShellSystemd, SystemdOverShell


class LocalhostTopology(SystemdOverShell):
    """Provides ``ProcessRuntime``, ``HostShell`` and ``SystemdManager``.

    ``SystemdManager`` is claimed even where systemd does not run (containers, CI): whether
    ``systemctl`` works is found out when a unit is applied, and reported as an Outcome.
    """

    CAPABILITIES: ClassVar[frozenset[type]] = frozenset({ProcessRuntime, HostShell, SystemdManager})
    kind: ClassVar[str] = "localhost"

    def __init__(
        self,
        *,
        unit_dir: str = "/etc/systemd/system",
        command_timeout: float = 30.0,
        run_as: tuple[int | None, int | None] = (None, None),
        fence: FenceSupervisor | None = None,
    ) -> None:
        self._command_timeout = command_timeout
        self._systemd = ShellSystemd(self, unit_dir, command_timeout)
        self._run_as = run_as
        self.fence = fence or FenceSupervisor()
        """Started by the agent as a supervised task (``fence.run()``)."""

    def capabilities(self) -> frozenset[type]:
        return self.CAPABILITIES

    async def close(self) -> None:
        return None

    # ProcessRuntime
    @property
    def run_as(self) -> tuple[int | None, int | None]:
        return self._run_as

    async def launch(self, launch: Launch) -> tuple[int, asyncio.Future[Exit]]:
        return await self.fence.spawn(launch)

    def stop_workload(self, wid: str) -> None:
        self.fence.stop(wid)

    def kill_workload(self, wid: str) -> None:
        self.fence.kill(wid)

    def set_deadline(
        self,
        wid: str,
        mode: str,
        deadline: float | None = None,
        support: Support = (),
    ) -> None:
        self.fence.set_deadline(wid, mode, deadline, support)

    # HostShell
    async def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            return CommandResult(tuple(argv), 127, "", str(exc))
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(input), timeout or self._command_timeout
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return CommandResult(tuple(argv), 124, "", f"timed out after {timeout}s")
        return CommandResult(
            tuple(argv),
            proc.returncode or 0,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )

    async def read_file(self, path: str) -> bytes | None:
        try:
            return await asyncio.to_thread(Path(path).read_bytes)
        except FileNotFoundError:
            return None

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        await asyncio.to_thread(_atomic_write, Path(path), data, mode)

    async def remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, path)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
