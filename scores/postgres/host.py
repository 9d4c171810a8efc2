"""Commands on the database host, as the database's OS user, through any ``HostShell``.

The same argv runs on localhost and over SSH. Every command is bounded twice: by coreutils'
``timeout`` *on the host* (so a command whose SSH channel died does not linger there) and by
the shell's own timeout. Commands run with an empty environment (``env -i``): nothing of the
agent's (NATS credentials, HARMONY_AGENT_*) reaches PostgreSQL tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence

import structlog

from topologies.capabilities import CommandResult, HostShell, RemoteShell

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_WRITE = 'umask 077; t="$1.tmp.$$"; cat > "$t" && chmod "$2" "$t" && mv -f "$t" "$1"'
_READ = 'test -e "$1" || exit 3; cat -- "$1"'
_MKDIR = 'mkdir -p -- "$1" && chown "$2:$3" -- "$1" && chmod 700 -- "$1"'
_DEADLINE = 'printf "%s\\n" "$2" > "$1.tmp" && mv -f "$1.tmp" "$1" && cat /proc/uptime'

log = structlog.get_logger("scores.postgres")


class PgError(Exception):
    """An expected failure: ``reason`` is a stable token, the message is for operators."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def boottime() -> float:
    """The clock of ``RunContext.deadline`` (SPEC-v2): CLOCK_BOOTTIME, counts suspend."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class PgHost:
    """The database host as seen through a ``HostShell``."""

    def __init__(self, shell: HostShell, os_user: str) -> None:
        self.shell = shell
        self.os_user = os_user
        self.remote = isinstance(shell, RemoteShell)
        self._me: str | None = None
        self._ids: tuple[int, int] | None = None
        self._offset: float | None = None  # lower bound of (host clock - our clock)

    @property
    def where(self) -> str:
        return self.shell.address if isinstance(self.shell, RemoteShell) else "localhost"

    async def me(self) -> str:
        if self._me is None:
            res = await self.shell.run(["id", "-un"], timeout=15)
            if not res.ok:
                raise PgError("unreachable", f"{self.where}: {res.summary()}")
            self._me = res.stdout.strip()
        return self._me

    async def _user_ids(self) -> tuple[int, int]:
        if self._ids is None:
            res = await self.shell.run(["id", "-u", self.os_user], timeout=15)
            group = await self.shell.run(["id", "-g", self.os_user], timeout=15)
            if not (res.ok and group.ok):
                raise PgError(
                    "no-such-user", f"os_user {self.os_user} does not exist on {self.where}"
                )
            self._ids = (int(res.stdout), int(group.stdout))
        return self._ids

    async def check_user(self) -> None:
        me = await self.me()
        await self._user_ids()
        if me not in (self.os_user, "root"):
            raise PgError(
                "wrong-user",
                f"commands on {self.where} run as {me}: they must run as root or as "
                f"os_user {self.os_user}",
            )

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        as_user: bool = True,
    ) -> CommandResult:
        """``argv`` on the host, as ``os_user`` unless ``as_user`` is False."""
        wrapped = ["timeout", "-k", "5", f"{max(timeout, 1.0):g}"]
        if as_user and await self.me() != self.os_user:
            uid, gid = await self._user_ids()
            wrapped += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"]
        wrapped += ["env", "-i", f"PATH={SAFE_PATH}", "LC_ALL=C.UTF-8", "LANG=C.UTF-8"]
        wrapped += [f"{k}={v}" for k, v in (env or {}).items()]
        result = await self.shell.run([*wrapped, *argv], input=input, timeout=timeout + 15)
        return CommandResult(tuple(argv), result.returncode, result.stdout, result.stderr)

    async def sh(
        self, script: str, *args: str, timeout: float = 30, input: bytes | None = None
    ) -> CommandResult:
        """A shell script run as os_user; ``args`` are its positional parameters."""
        return await self.run(["sh", "-c", script, "sh", *args], timeout=timeout, input=input)

    async def read(self, path: str) -> str | None:
        res = await self.sh(_READ, path)
        if res.returncode == 3:
            return None
        if not res.ok:
            raise PgError("unreadable", f"cannot read {path} on {self.where}: {res.summary()}")
        return res.stdout

    async def write(self, path: str, data: str | bytes, mode: int = 0o600) -> None:
        payload = data.encode() if isinstance(data, str) else data
        res = await self.sh(_WRITE, path, f"{mode:o}", input=payload)
        if not res.ok:
            raise PgError("unwritable", f"cannot write {path} on {self.where}: {res.summary()}")

    async def write_if_changed(self, path: str, data: str, mode: int = 0o600) -> bool:
        if await self.read(path) == data:
            return False
        await self.write(path, data, mode)
        return True

    async def owner(self, path: str) -> tuple[str, str] | None:
        """(owner, file type) of ``path`` as the shell's user sees it; None if absent."""
        res = await self.run(["stat", "-c", "%U\t%F", "--", path], timeout=15, as_user=False)
        if not res.ok:
            missing = "No such file" in res.stderr
            if missing:
                return None
            raise PgError("unreachable", f"cannot stat {path} on {self.where}: {res.summary()}")
        owner, _, kind = res.stdout.strip().partition("\t")
        return owner, kind

    async def make_dir(self, path: str) -> None:
        """Create ``path`` (0700, owned by os_user) and its missing parents."""
        if await self.me() == "root":
            uid, gid = await self._user_ids()
            res = await self.run(
                ["sh", "-c", _MKDIR, "sh", path, str(uid), str(gid)],
                timeout=15,
                as_user=False,
            )
        else:
            res = await self.run(["mkdir", "-p", "-m", "700", "--", path], timeout=15)
        if not res.ok:
            raise PgError("unwritable", f"cannot create {path} on {self.where}: {res.summary()}")

    # The lease deadline, in the host's CLOCK_BOOTTIME.
    def write_deadline_now(self, path: str, deadline: float | None) -> None:
        """Local hosts only: synchronous, so ``extend_deadline`` stays cheap and ordered."""
        assert not self.remote
        value = "none" if deadline is None else repr(deadline)
        directory = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".deadline.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(value + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def write_deadline(self, path: str, deadline: float | None) -> None:
        """Write our-clock ``deadline`` as a host-clock value that is never later than it.

        On a remote host the clocks differ: each write also reads the host's CLOCK_BOOTTIME
        (``/proc/uptime``); from the round trip (sent at t0, answered at t1, host clock R)
        the offset is at least R - t1, and the next deadline written is ours + that bound,
        so transmission delay can only make the host's deadline *earlier*.
        """
        if not self.remote:
            await asyncio.to_thread(self.write_deadline_now, path, deadline)
            return
        if self._offset is None:
            await self.measure_offset()
        assert self._offset is not None
        value = "none" if deadline is None else repr(deadline + self._offset)
        t0 = boottime()
        res = await self.shell.run(["sh", "-c", _DEADLINE, "sh", path, value], timeout=10)
        t1 = boottime()
        if not res.ok:
            raise PgError("unwritable", f"cannot write the deadline on {self.where}")
        self._update_offset(res.stdout, t0, t1)

    async def measure_offset(self) -> float:
        if not self.remote:
            return 0.0
        t0 = boottime()
        res = await self.shell.run(["cat", "/proc/uptime"], timeout=10)
        t1 = boottime()
        if not res.ok:
            raise PgError("unreachable", f"cannot read the clock of {self.where}")
        self._update_offset(res.stdout, t0, t1)
        assert self._offset is not None
        return self._offset

    def _update_offset(self, uptime: str, t0: float, t1: float) -> None:
        host_clock = float(uptime.split(maxsplit=1)[0])  # 10 ms steps, rounded down: early
        self._offset = host_clock - t1
        log.debug("host clock offset", where=self.where, offset=self._offset, rtt=t1 - t0)

    def host_deadline(self, deadline: float | None) -> float | None:
        """``deadline`` in the host's clock, by the last offset measured (0 locally)."""
        if deadline is None or not self.remote:
            return deadline
        assert self._offset is not None, "measure_offset() first"
        return deadline + self._offset
