"""The PostgreSQL server under an Interpret: binaries, files, configuration, SQL, start and
stop of one data directory on a host reached through ``HostShell``.

``PgServer`` is the lowest of the Interpret's three layers (``PostgresInterpret`` in
``scores.postgres.interpret`` is the public face, ``PgReplication`` in
``scores.postgres.replication`` the role changes). Its methods raise ``PgError``; the
public methods above turn that into values. The attributes are set by
``PostgresInterpret.__init__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from scores.base import (
    PrimaryInfo,
    Role,
    RunContext,
)
from scores.postgres import config as cfg
from scores.postgres.config import Layout, RoleSettings
from scores.postgres.host import PgError, PgHost, boottime
from scores.postgres.spec import PostgresSpec

log = structlog.get_logger("scores.postgres")

WATCHDOG_SOURCE = Path(__file__).with_name("watchdog.py")
NEEDED_BINARIES = (
    "postgres",
    "pg_ctl",
    "initdb",
    "pg_basebackup",
    "pg_rewind",
    "psql",
    "pg_isready",
    "pg_controldata",
)
MIN_VERSION = 13  # pg_rewind runs crash recovery itself; pg_promote(); reloadable conninfo
SQL_TIMEOUT = 20.0
PREPARED_FOR = 60.0
"""Seconds a prepared host (directories, hba, certificates) is trusted without checking."""
MIN_DEADLINE_LEFT = 0.5
"""A replica is not promoted with less lease left than this: the watchdog must see it first."""

_FIND_BIN = r"""
if [ -n "$1" ]; then d="$1"
else
  d=""
  if p=$(command -v pg_ctl 2>/dev/null); then d=$(dirname "$(readlink -f "$p")"); fi
  if [ -z "$d" ]; then
    for c in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
      if [ -x "$c/pg_ctl" ]; then d="$c"; break; fi
    done
  fi
fi
if [ -z "$d" ]; then echo "no pg_ctl on PATH nor in /usr/lib/postgresql/*/bin"; exit 3; fi
missing=""
for b in $NEEDED; do [ -x "$d/$b" ] || missing="$missing $b"; done
if [ -n "$missing" ]; then echo "$d lacks:$missing"; exit 3; fi
echo "$d"
"$d/postgres" --version
"""

_INSPECT = r"""
d="$1"; b="$2"
if ! [ -r "$d" ] || ! [ -x "$d" ]; then echo unreadable; exit 0; fi
if [ -z "$(ls -A -- "$d")" ]; then echo empty; exit 0; fi
if ! [ -f "$d/PG_VERSION" ]; then echo foreign; exit 0; fi
echo "version $(cat "$d/PG_VERSION")"
if [ -f "$d/standby.signal" ]; then echo standby; fi
"$b/pg_ctl" status -D "$d" >/dev/null 2>&1; echo "status $?"
if [ -f "$d/postmaster.pid" ]; then echo "pid $(head -n 1 "$d/postmaster.pid")"; fi
"""

_STATUS_SQL = """
SELECT pg_is_in_recovery(),
  CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() - '0/0'
       ELSE pg_current_wal_lsn() - '0/0' END,
  pg_last_wal_receive_lsn() - '0/0',
  CASE WHEN NOT pg_is_in_recovery()
       THEN ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
  (SELECT received_tli FROM pg_stat_wal_receiver),
  (SELECT NULLIF(min_recovery_end_timeline, 0) FROM pg_control_recovery()),
  (SELECT timeline_id FROM pg_control_checkpoint()),
  (SELECT latest_end_lsn - '0/0' FROM pg_stat_wal_receiver),
  (SELECT status || ' from ' || coalesce(sender_host, '?') || ':'
          || coalesce(sender_port::text, '?') FROM pg_stat_wal_receiver),
  current_setting('harmony.fencing_token', true),
  CASE WHEN to_regclass('harmony.term') IS NOT NULL THEN
    (xpath('/row/token/text()',
           query_to_xml('SELECT token FROM harmony.term', false, true, '')))[1]::text
  END,
  CASE WHEN NOT pg_is_in_recovery() THEN
    (SELECT string_agg(application_name || ' ' || sync_state || ' lag '
        || coalesce((pg_current_wal_lsn() - replay_lsn)::text, '?'), ', ' ORDER BY application_name)
       FROM pg_stat_replication)
  END,
  pg_postmaster_start_time()::text
"""


@dataclass(frozen=True)
class DataState:
    exists: bool
    standby: bool = False
    running: bool = False
    pid: int | None = None


class PgServer:
    """The server plumbing shared by the role changes and the public methods."""

    spec: PostgresSpec
    _host: PgHost
    _ctx: RunContext | None
    _layout: Layout | None
    _bin: str | None
    _bin_wanted: str | None
    _role: Role | None
    _deadline: float | None
    _sync_names: tuple[str, ...]
    _token: int | None
    _following: PrimaryInfo | None
    timings: dict[str, float]
    last_rewind_error: str | None
    _replica_timeline: tuple[str, int | None]
    _checkpoint_task: asyncio.Task[None] | None
    _watched: tuple[int, int] | None
    _written_conf: str | None
    _prepared: tuple[Layout, float] | None

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise PgError("not-attached", "no RunContext yet: call start_*() or attach(ctx)")
        return self._layout

    @property
    def application_name(self) -> str | None:
        ctx = self._ctx
        return cfg.application_name(ctx.site, ctx.node) if ctx else None

    async def _set_deadline_file(self, deadline: float | None) -> None:
        await self._host.write_deadline(self.layout.deadline_file, deadline)

    def _check_deadline(self) -> None:
        if self._deadline is not None and boottime() >= self._deadline:
            raise PgError("deadline", "the lease deadline has passed: not acting as primary")

    # ---------------------------------------------------------------- plumbing
    async def _bin_dir(self) -> str:
        if self._bin is None:
            res = await self._host.run(
                ["sh", "-c", _FIND_BIN, "sh", self._bin_wanted or ""],
                timeout=20,
                env={"NEEDED": " ".join(NEEDED_BINARIES)},
            )
            lines = res.stdout.strip().splitlines()
            if not res.ok or len(lines) < 2:
                detail = (lines or [res.stderr.strip() or res.summary()])[0]
                raise PgError(
                    "missing-binaries",
                    f"PostgreSQL binaries not found on {self._host.where}: {detail} "
                    "(install postgresql-15 or set bin_dir)",
                )
            match = re.search(r"\(PostgreSQL\) (\d+)", lines[1])
            if match is None or int(match.group(1)) < MIN_VERSION:
                raise PgError(
                    "missing-binaries",
                    f"{lines[0]}: {lines[1]!r}: PostgreSQL {MIN_VERSION} or newer is needed",
                )
            self._bin = lines[0]
        return self._bin

    async def _tool(self, name: str) -> str:
        return f"{await self._bin_dir()}/{name}"

    async def _prepare(self) -> Layout:
        """Check the host and write everything but postgresql.conf; nothing is deleted."""
        layout = self.layout
        done = self._prepared
        if done is not None and done[0] == layout and time.monotonic() - done[1] < PREPARED_FOR:
            return layout
        self._prepared = self._written_conf = None
        await self._host.check_user()
        await self._bin_dir()
        if len(layout.socket_path) > 107:
            raise PgError(
                "bad-path", f"socket path {layout.socket_path} is too long for Unix sockets"
            )
        found = await self._host.owner(layout.run_dir)
        if found is None:
            await self._host.make_dir(layout.run_dir)
        elif found[0] != self.spec.os_user:
            raise PgError(
                "run-dir-owned",
                f"run directory {layout.run_dir} is owned by {found[0]}, not "
                f"{self.spec.os_user}; nothing was changed",
            )
        res = await self._host.sh(
            'test -w "$1" && mkdir -p -m 700 "$1/log" "$1/tls" && mkdir -p -m 755 "$1/sock"',
            layout.run_dir,
        )
        if not res.ok:
            raise PgError(
                "unwritable",
                f"os_user {self.spec.os_user} cannot write {layout.run_dir} on "
                f"{self._host.where} (are its parent directories traversable?)",
            )
        await self._host.write_if_changed(layout.watchdog, WATCHDOG_SOURCE.read_text(), 0o600)
        await self._host.write_if_changed(layout.hba_file, cfg.pg_hba(self.spec, self._tls), 0o600)
        await self._host.write_if_changed(layout.ident_file, cfg.HEADER, 0o600)
        if self.spec.tls is not None:
            await self._copy_tls()
        else:
            password = await self._password()
            pgpass = cfg.pgpass(self.spec.replication_user, password)
            await self._host.write_if_changed(layout.passfile, pgpass, 0o600)
        self._prepared = (layout, time.monotonic())
        return layout

    @property
    def _tls(self) -> bool:
        return self.spec.tls is not None

    async def _copy_tls(self) -> None:
        tls = self.spec.tls
        assert tls is not None
        copies = {
            "ca.crt": tls.ca_file,
            "server.crt": tls.cert_file,
            "server.key": tls.key_file,
            "client.crt": tls.client_cert_file or tls.cert_file,
            "client.key": tls.client_key_file or tls.key_file,
        }
        for name, source in copies.items():
            data = await self._read_source(source, "tls")
            await self._host.write_if_changed(self.layout.tls(name), data, 0o600)

    async def _read_source(self, path: str, what: str) -> str:
        try:
            data = await self._host.shell.read_file(path)
        except OSError as exc:
            raise PgError("unreadable", f"{what}: cannot read {path}: {exc}") from None
        if data is None:
            raise PgError("unreadable", f"{what}: {path} does not exist on {self._host.where}")
        return data.decode()

    async def _password(self) -> str:
        assert self.spec.replication_password_file is not None
        text = await self._read_source(
            self.spec.replication_password_file, "replication_password_file"
        )
        password = text.rstrip("\r\n")
        if not password or not all(32 < ord(c) < 127 for c in password):
            raise PgError(
                "bad-password",
                "replication_password_file must hold one line of printable ASCII without spaces",
            )
        return password

    async def _inspect(self) -> DataState:
        layout = self.layout
        found = await self._host.owner(layout.data_dir)
        if found is None:
            return DataState(exists=False)
        owner, kind = found
        if kind != "directory":
            raise PgError(
                "not-a-data-dir", f"{layout.data_dir} is a {kind}, not a directory; untouched"
            )
        if owner != self.spec.os_user:
            raise PgError(
                "data-dir-owned",
                f"data directory {layout.data_dir} is owned by {owner}, not "
                f"{self.spec.os_user}: refusing to use it; nothing was changed",
            )
        res = await self._host.sh(_INSPECT, layout.data_dir, await self._bin_dir())
        words = dict(
            [*line.split(" ", 1), ""][:2] for line in res.stdout.splitlines() if line.strip()
        )
        if not res.ok or "unreadable" in words:
            raise PgError("unreadable", f"os_user cannot read {layout.data_dir}: {res.summary()}")
        if "empty" in words:
            return DataState(exists=False)
        if "foreign" in words:
            raise PgError(
                "not-a-data-dir",
                f"{layout.data_dir} is not empty and holds no PostgreSQL cluster "
                "(no PG_VERSION): refusing to touch it; nothing was changed",
            )
        version = words.get("version", "").strip()
        binaries = await self._major()
        if version != binaries:
            raise PgError(
                "version-mismatch",
                f"{layout.data_dir} is a PostgreSQL {version} cluster, the binaries are "
                f"{binaries}; nothing was changed",
            )
        pid = words.get("pid", "").strip()
        return DataState(
            exists=True,
            standby="standby" in words,
            running=words.get("status", "").strip() == "0",
            pid=int(pid) if pid.isdigit() else None,
        )

    async def _major(self) -> str:
        bin_dir = await self._bin_dir()
        match = re.search(r"/(\d+)/bin$", bin_dir)
        if match:
            return match.group(1)
        res = await self._host.run([f"{bin_dir}/postgres", "--version"], timeout=15)
        found = re.search(r"\(PostgreSQL\) (\d+)", res.stdout)
        return found.group(1) if found else "?"

    async def _sql(self, sql: str, *, conninfo: str | None = None) -> list[list[str]]:
        """Run ``sql`` with psql (over the local socket as os_user unless ``conninfo``)."""
        target = conninfo or cfg.conninfo(
            {
                "host": self.layout.socket_dir,
                "port": self.layout.port,
                "dbname": "postgres",
                "user": self.spec.os_user,
                "application_name": "harmony-agent",
                "connect_timeout": 5,
            }
        )
        argv = [await self._tool("psql"), "-X", "-q", "-A", "-t", "-F", "\x1f"]
        argv += ["-v", "ON_ERROR_STOP=1", "-d", target, "-f", "-"]
        res = await self._host.run(argv, timeout=SQL_TIMEOUT, input=sql.encode())
        if not res.ok:
            lines = (res.stderr.strip() or res.stdout.strip() or res.summary()).splitlines()
            errors = [ln for ln in lines if "ERROR:" in ln or "FATAL:" in ln]
            raise PgError("sql-failed", (errors or lines or [res.summary()])[-1])
        return [line.split("\x1f") for line in res.stdout.splitlines() if line]

    async def _watchdog_state(self) -> dict[str, Any]:
        text = await self._host.read(self.layout.watchdog_state)
        if not text:
            return {}
        with contextlib.suppress(ValueError):
            state: dict[str, Any] = json.loads(text)
            return state
        return {}

    async def _supervised(self, state: DataState) -> bool:
        """Is the running postmaster the child of a live watchdog of ours?

        Remembered per postmaster: if its watchdog dies, the postmaster gets SIGKILL
        (PR_SET_PDEATHSIG), so the same postmaster pid still running means the same
        watchdog still runs."""
        known = self._watched
        if known is not None and state.pid is not None and known[1] == state.pid:
            return True
        watchdog = await self._watchdog_state()
        if watchdog.get("state") != "running" or watchdog.get("postgres") != state.pid:
            return False
        pid = watchdog.get("watchdog", 0)
        res = await self._host.sh('tr "\\0" " " < "/proc/$1/cmdline"', str(pid))
        ok = res.ok and "watchdog.py start" in res.stdout and self.layout.run_dir in res.stdout
        if ok and isinstance(pid, int) and state.pid is not None:
            self._watched = (pid, state.pid)
        return ok

    async def _signal_watchdog(self) -> None:
        """Wake the watchdog to read the deadline file now (it also does every 0.2 s)."""
        pid = self._watched[0] if self._watched else None
        if pid is None:
            watchdog = await self._watchdog_state()
            found = watchdog.get("watchdog") if watchdog.get("state") == "running" else None
            pid = found if isinstance(found, int) else None
        if pid:
            await self._host.run(["kill", "-USR1", str(pid)], timeout=10)

    # ---------------------------------------------------------------- configuration
    def _primary_settings(self) -> RoleSettings:
        names = cfg.sync_standby_names(self.spec.synchronous, self._sync_names)
        return RoleSettings(None, names, self._token)

    def _replica_settings(self, primary: PrimaryInfo | None) -> RoleSettings:
        """Replicas carry the synchronous names they would need as primary (ignored in
        recovery), so a promotion needs no reload before its first commit."""
        conn = self._replication_conninfo(primary) if primary else None
        names = cfg.sync_standby_names(self.spec.synchronous, self._sync_names)
        return RoleSettings(conn, names, primary.token if primary else self._token)

    def _replication_params(
        self, primary: PrimaryInfo, *, application_name: str | None, dbname: str | None = None
    ) -> dict[str, str | int | None]:
        layout = self.layout
        params: dict[str, str | int | None] = {
            "host": primary.host,
            "port": primary.port,
            "user": self.spec.replication_user,
            "dbname": dbname,
            "application_name": application_name,
            "connect_timeout": 5,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "target_session_attrs": "read-write",
        }
        if self._tls:
            params |= {
                "sslmode": "verify-full",
                "sslrootcert": layout.tls("ca.crt"),
                "sslcert": layout.tls("client.crt"),
                "sslkey": layout.tls("client.key"),
            }
        else:
            params |= {"passfile": layout.passfile, "sslmode": "prefer"}
        return params

    def _replication_conninfo(self, primary: PrimaryInfo) -> str:
        return cfg.conninfo(
            self._replication_params(primary, application_name=self.application_name)
        )

    async def _configure(self, role: RoleSettings) -> bool:
        """Write postgresql.conf for ``role``; True when it changed. What we wrote last is
        remembered for as long as the host counts as prepared (a minute, or until a
        failure), which saves reading it back on every role change."""
        ctx = self._ctx
        assert ctx is not None
        text = cfg.postgresql_conf(self.spec, self.layout, ctx.app, role, self._tls)
        if self._prepared is not None and self._written_conf == text:
            return False
        changed = await self._host.write_if_changed(self.layout.config_file, text, 0o600)
        self._written_conf = text
        return changed

    async def _reload(self) -> None:
        await self._sql("SELECT pg_reload_conf()")

    async def _clean_auto_conf(self) -> None:
        path = f"{self.layout.data_dir}/postgresql.auto.conf"
        text = await self._host.read(path)
        if text is not None and cfg.strip_owned(text) != text:
            await self._host.write(path, cfg.strip_owned(text), 0o600)

    # ---------------------------------------------------------------- start / stop
    async def _start(self, *, standby: bool, role: RoleSettings) -> str:
        layout = self.layout
        await self._configure(role)
        await self._clean_auto_conf()
        marker = 'touch -- "$1"' if standby else 'rm -f -- "$1"'
        await self._host.sh(marker, layout.standby_signal)
        await self._check_port()
        deadline = None if standby else self._deadline
        if deadline is not None:
            self._check_deadline()
        await self._set_deadline_file(deadline)
        argv = ["python3", "-I", layout.watchdog, "start", "--state", layout.watchdog_state]
        argv += ["--deadline-file", layout.deadline_file, "--log", layout.watchdog_log]
        argv += ["--stop-timeout", repr(self.spec.stop_timeout)]
        host_deadline = self._host.host_deadline(deadline)
        if host_deadline is not None:
            argv += ["--deadline", repr(host_deadline)]
        argv += ["--", await self._tool("postgres"), f"--config-file={layout.config_file}"]
        started = time.monotonic()
        res = await self._host.run(argv, timeout=45)
        reply: dict[str, Any] = {}
        with contextlib.suppress(ValueError, IndexError):
            reply = json.loads(res.stdout.strip().splitlines()[-1])
        if "postgres" not in reply:
            error = reply.get("error") or res.summary()
            reason = "deadline" if "deadline" in str(error) else "spawn-failed"
            raise PgError(reason, f"cannot start postgres: {error}")
        if isinstance(reply.get("watchdog"), int) and isinstance(reply.get("postgres"), int):
            self._watched = (reply["watchdog"], reply["postgres"])
        detail = await self._wait_ready(standby)
        self.timings["start"] = time.monotonic() - started
        return detail

    async def _wait_ready(self, standby: bool) -> str:
        layout = self.layout
        end = time.monotonic() + self.spec.start_timeout
        isready = [await self._tool("pg_isready"), "-q", "-h", layout.socket_dir]
        isready += ["-p", str(layout.port), "-d", "postgres", "-t", "2"]
        while True:
            res = await self._host.run(isready, timeout=10)
            if res.returncode == 0:
                return "accepting connections"
            watchdog = await self._watchdog_state()
            if watchdog.get("state") == "exited":
                raise await self._start_failure(watchdog)
            if time.monotonic() > end:
                if standby and res.returncode == 1:
                    return "started; not consistent yet (waiting for WAL from the primary)"
                raise PgError(
                    "not-ready",
                    f"postgres did not accept connections within {self.spec.start_timeout:g}s "
                    f"(see {layout.watchdog_log} and {layout.log_dir})",
                )
            await asyncio.sleep(0.1)

    async def _start_failure(self, watchdog: dict[str, Any]) -> PgError:
        if watchdog.get("reason") == "deadline":
            return PgError("deadline", "killed at the lease deadline while starting")
        res = await self._host.sh('tail -n 30 -- "$1"', self.layout.watchdog_log)
        lines = [ln for ln in res.stdout.splitlines() if "FATAL" in ln or "ERROR" in ln]
        last = lines[-1] if lines else (res.stdout.strip().splitlines() or ["no log"])[-1]
        if "already in use" in res.stdout:
            return PgError("port-in-use", f"port {self.layout.port} is in use: {last}")
        code = watchdog.get("returncode")
        return PgError("crashed", f"postgres exited with {code} while starting: {last}")

    async def _check_port(self) -> None:
        layout = self.layout
        res = await self._host.run(
            ["python3", "-I", layout.watchdog, "check-port", layout.listen, str(layout.port)],
            timeout=15,
        )
        if res.returncode == 3:
            raise PgError("port-in-use", res.stdout.strip() + f" on {self._host.where}")
        if not res.ok:
            raise PgError("bad-listen", (res.stdout.strip() or res.summary()))

    async def _stop(self) -> bool:
        """Fast shutdown, then immediate, then SIGKILL of the group; True if it ran."""
        try:
            state = await self._inspect()
        except PgError:
            if self._watched is None:
                return False  # a directory we refuse to use runs nothing we started
            raise
        if not state.running:
            return False
        pg_ctl = await self._tool("pg_ctl")
        data = self.layout.data_dir
        wait = f"{max(1, int(self.spec.stop_timeout))}"
        res = await self._host.run(
            [pg_ctl, "stop", "-D", data, "-m", "fast", "-w", "-t", wait],
            timeout=self.spec.stop_timeout + 10,
        )
        if not res.ok:
            log.warning(
                "pg_fast_shutdown_failed",
                msg="fast shutdown failed; immediate",
                error=res.summary(),
            )
            res = await self._host.run(
                [pg_ctl, "stop", "-D", data, "-m", "immediate", "-w", "-t", "15"], timeout=25
            )
        if not res.ok and state.pid:
            await self._host.run(["kill", "-KILL", f"-{state.pid}"], timeout=10)
            for _ in range(100):
                if not (await self._inspect()).running:
                    break
                await asyncio.sleep(0.1)
            else:
                raise PgError("stop-failed", f"postgres pid {state.pid} does not stop")
        return True

    async def _down_reason(self) -> str:
        watchdog = await self._watchdog_state()
        reason = watchdog.get("reason")
        if reason == "deadline":
            return "killed by its watchdog at the lease deadline"
        if reason:
            return f"{reason} (exit {watchdog.get('returncode')})"
        return "never started here"

    async def _control_position(self) -> tuple[int | None, int | None]:
        """(timeline, position) of stopped data from its control file: the latest checkpoint
        (or the minimum recovery end, if later), a lower bound of the WAL it holds (exact
        after a clean shutdown, whose checkpoint is the last record)."""
        res = await self._host.run(
            [await self._tool("pg_controldata"), "-D", self.layout.data_dir], timeout=15
        )
        found = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in res.stdout.splitlines())
        )
        timeline = _int(found.get("Latest checkpoint's TimeLineID"))
        positions = []
        for key in ("Latest checkpoint location", "Minimum recovery ending location"):
            with contextlib.suppress(ValueError):
                positions.append(cfg.lsn(found.get(key, "")))
        recovery_tli = _int(found.get("Min recovery ending loc's timeline"))
        if recovery_tli and timeline and recovery_tli > timeline:
            timeline = recovery_tli
        return timeline, max(positions) if positions else None


def _int(text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def _lsn(value: int | None) -> str:
    return "?" if value is None else f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _where(primary: PrimaryInfo) -> str:
    return f"{primary.site}/{primary.node} ({primary.host}:{primary.port})"


def _msg(exc: PgError) -> str:
    return f"{exc} [{exc.reason}]"


def _verifies(verifier: str, password: str) -> bool:
    """Does the stored SCRAM ``verifier`` belong to ``password``? (keeps its salt)"""
    import base64

    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$[^:]+:.+", verifier)
    if not match:
        return False
    salt = base64.b64decode(match.group(2))
    return cfg.scram_verifier(password, salt=salt, iterations=int(match.group(1))) == verifier
