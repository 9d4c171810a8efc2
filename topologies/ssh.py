"""A Linux host reached over SSH (asyncssh), with the host key always verified.

One connection is opened lazily and reused for every command: SystemdUnit observes every
few seconds, and a handshake per command would cost more than the command.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence
from typing import Any, ClassVar

import asyncssh

from topologies.capabilities import CommandResult, HostShell, RemoteShell, SystemdManager
from topologies.config import LinuxSshConfig
from topologies.systemd import ShellSystemd, SystemdOverShell

_WRITE = 'umask 077; t="$1.harmony-tmp"; cat > "$t" && chmod "$2" "$t" && mv -f "$t" "$1"'


class LinuxSshTopology(SystemdOverShell):
    """Provides ``RemoteShell``, ``HostShell`` and ``SystemdManager`` on one remote host.

    Command failures and timeouts are CommandResults (124 = timed out, 255 = SSH failure,
    as OpenSSH's client reports them), so Interprets turn them into Outcomes.
    """

    CAPABILITIES: ClassVar[frozenset[type]] = frozenset({RemoteShell, HostShell, SystemdManager})
    kind: ClassVar[str] = "linux-ssh"

    def __init__(self, config: LinuxSshConfig) -> None:
        self._config = config
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._systemd = ShellSystemd(self, config.unit_dir, config.command_timeout or 10.0)

    def capabilities(self) -> frozenset[type]:
        return self.CAPABILITIES

    @property
    def address(self) -> str:
        return f"{self._config.user}@{self._config.host}:{self._config.port}"

    def _options(self) -> dict[str, Any]:
        cfg = self._config
        options: dict[str, Any] = {
            "port": cfg.port,
            "username": cfg.user,
            "connect_timeout": cfg.connect_timeout,
            "keepalive_interval": cfg.keepalive_interval,
        }
        if cfg.key_file is not None:
            options["client_keys"] = [str(cfg.key_file)]
        # asyncssh treats known_hosts=None as "do not verify"; never pass None. Leaving it
        # out means ~/.ssh/known_hosts, which is what an operator expects.
        if cfg.known_hosts is not None:
            options["known_hosts"] = str(cfg.known_hosts)
        return options

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The shared connection, reopened if the previous one was lost."""
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            self._conn = await asyncssh.connect(self._config.host, **self._options())
            return self._conn

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                self._conn.close()
                await self._conn.wait_closed()
                self._conn = None

    # HostShell
    async def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        argv_t = tuple(argv)
        limit = timeout or self._config.command_timeout or 10.0
        try:
            conn = await self.connection()
            result = await asyncio.wait_for(
                conn.run(shlex.join(argv_t), input=input, encoding=None, check=False), limit
            )
        except TimeoutError:
            return CommandResult(argv_t, 124, "", f"timed out after {limit}s on {self.address}")
        except (OSError, asyncssh.Error) as exc:
            return CommandResult(argv_t, 255, "", f"ssh {self.address}: {exc}")
        return CommandResult(
            argv_t,
            result.exit_status if result.exit_status is not None else 255,
            _text(result.stdout),
            _text(result.stderr),
        )

    async def read_file(self, path: str) -> bytes | None:
        argv = ["sh", "-c", 'test -e "$1" || exit 3; cat "$1"', "sh", path]
        try:
            conn = await self.connection()
            result = await asyncio.wait_for(
                conn.run(shlex.join(argv), encoding=None, check=False),
                self._config.command_timeout or 10.0,
            )
        except (TimeoutError, asyncssh.Error) as exc:
            raise OSError(f"reading {path} on {self.address}: {exc or 'timed out'}") from exc
        if result.exit_status == 3:
            return None
        if result.exit_status != 0:
            raise OSError(f"reading {path} on {self.address}: {_text(result.stderr).strip()}")
        out = result.stdout
        return out if isinstance(out, bytes) else b""

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        res = await self.run(["sh", "-c", _WRITE, "sh", path, f"{mode:o}"], input=data)
        if not res.ok:
            raise OSError(f"writing {path} on {self.address}: {res.summary()}")

    async def remove_file(self, path: str) -> None:
        res = await self.run(["rm", "-f", "--", path])
        if not res.ok:
            raise OSError(f"removing {path} on {self.address}: {res.summary()}")


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data if isinstance(data, str) else ""
