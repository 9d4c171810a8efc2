"""The PostgreSQL Interpret: one instance playing the role the controller gives it.

Every public method returns a value (``Outcome``, ``Observation``, ``ReplicationStatus``) and
never raises for a host's or a database's bad day. Role changes are serialised by a lock;
``status``/``observe`` only read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import structlog

from scores.base import (
    REPLICATION_EXTRA,
    Deadline,
    Observation,
    Outcome,
    PrimaryInfo,
    ReplicatedInterpret,
    ReplicationStatus,
    Role,
    RunContext,
    WorkloadState,
)
from scores.postgres import config as cfg
from scores.postgres import spec as _spec_module
from scores.postgres.config import Layout, RoleSettings
from scores.postgres.host import PgError, PgHost, boottime
from scores.postgres.spec import PostgresSite, PostgresSpec
from topologies.capabilities import HostShell, RemoteShell

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


class PostgresInterpret(ReplicatedInterpret):
    """PostgreSQL on a host reached through ``HostShell`` (localhost or SSH)."""

    enforces_deadline: ClassVar[bool] = True

    def __init__(self, spec: PostgresSpec, shell: HostShell) -> None:
        self.spec = spec
        self._host = PgHost(shell, spec.os_user)
        self._lock = asyncio.Lock()
        self._ctx: RunContext | None = None
        self._layout: Layout | None = None
        self._advertise: str | None = None
        self._bin: str | None = None
        self._bin_wanted: str | None = spec.bin_dir
        self._role: Role | None = None
        self._deadline: float | None = None  # CLOCK_BOOTTIME, ours
        self._sync_names: tuple[str, ...] = ()
        self._token: int | None = None
        self._following: PrimaryInfo | None = None
        self._error: PgError | None = None
        self._deadline_pending = False
        self._deadline_task: asyncio.Task[None] | None = None
        self.timings: dict[str, float] = {}
        """Seconds the last initdb, basebackup, rewind, promote and start took."""
        self.role_timeout = (
            spec.stop_timeout
            + spec.basebackup_timeout
            + spec.start_timeout
            + spec.promote_timeout
            + 60.0
        )
        self.last_rewind_error: str | None = None
        self._replica_timeline: tuple[str, int | None] = ("", None)
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._watched: tuple[int, int] | None = None
        """(watchdog pid, postmaster pid) known to supervise the running instance."""
        self._written_conf: str | None = None
        self._prepared: tuple[Layout, float] | None = None
        """The layout last prepared, and when: files are checked again after a minute (a
        rotated certificate is copied) or after any failure."""
        """(postmaster start time, highest timeline seen) of the running replica."""

    # ---------------------------------------------------------------- identity and files
    def attach(self, ctx: RunContext) -> None:
        """Learn app, site and state_dir (paths) without touching anything.

        Every ``start_*``/``promote`` attaches; call it yourself before ``status()`` or
        ``demote()`` in an agent that restarted and has not started anything yet.
        """
        site = self.spec.sites.get(ctx.site, PostgresSite())
        run_dir = site.run_dir or self.spec.run_dir or f"{ctx.workload_dir}/{ctx.app}"
        data_dir = site.data_dir or self.spec.data_dir or f"{run_dir}/pgdata"
        self._ctx = ctx
        self._layout = Layout(
            run_dir=run_dir,
            data_dir=data_dir,
            port=site.port or self.spec.port,
            listen=site.listen or self.spec.listen,
        )
        self._advertise = site.advertise or self.spec.advertise
        self._bin_wanted = site.bin_dir or self.spec.bin_dir

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            raise PgError("not-attached", "no RunContext yet: call start_*() or attach(ctx)")
        return self._layout

    @property
    def application_name(self) -> str | None:
        ctx = self._ctx
        return cfg.application_name(ctx.site, ctx.node) if ctx else None

    def endpoint(self) -> dict[str, Any]:
        """``host``/``port`` replicas and clients connect to, and this instance's
        ``application_name`` (what ``set_sync_standbys`` lists)."""
        ctx = self._ctx
        port = self._layout.port if self._layout else self.spec.port
        return {
            "host": self._advertised_host(),
            "port": port,
            "application_name": self.application_name,
            "site": ctx.site if ctx else None,
            "node": ctx.node if ctx else None,
        }

    def _advertised_host(self) -> str:
        if self._advertise:
            return self._advertise
        listen = self._layout.listen if self._layout else self.spec.listen
        if listen not in {"*", "0.0.0.0", "::", ""} and "," not in listen:
            return listen
        shell = self._host.shell
        if isinstance(shell, RemoteShell):
            host = shell.address.rsplit("@", 1)[-1].rsplit(":", 1)[0]
            return host.strip("[]")
        return socket.getfqdn()

    # ---------------------------------------------------------------- deadline (fencing)
    def set_deadline(self, deadline: Deadline | None) -> None:
        """Allow a primary to accept writes until this CLOCK_BOOTTIME instant (None: no
        deadline). Pushed to the watchdog on every renewal: it does not follow the session
        thread by itself, so ``follows_session`` makes no difference here."""
        self.extend_deadline(deadline.at) if deadline is not None else self.clear_deadline()

    def extend_deadline(self, at: float) -> None:
        """Allow a primary to accept writes until this CLOCK_BOOTTIME value."""
        self._deadline = at
        self._push_deadline()

    def clear_deadline(self) -> None:
        self._deadline = None
        self._push_deadline()

    def _push_deadline(self) -> None:
        if self._layout is None or self._role is Role.REPLICA:
            return  # replicas run without a deadline; promote() writes it first
        if not self._host.remote:
            try:
                self._host.write_deadline_now(self._layout.deadline_file, self._deadline)
            except FileNotFoundError:
                pass  # nothing created yet: the first start writes it
            except OSError as exc:
                log.warning(
                    "pg_deadline_write_failed", msg="cannot write the deadline", error=str(exc)
                )
            return
        self._deadline_pending = True
        if self._deadline_task is None or self._deadline_task.done():
            self._deadline_task = asyncio.get_running_loop().create_task(
                self._write_deadlines(), name="postgres-deadline"
            )

    async def _write_deadlines(self) -> None:
        """Remote hosts: one writer, newest value last (a failed write keeps the old one)."""
        while self._deadline_pending and self._layout is not None:
            self._deadline_pending = False
            try:
                await self._host.write_deadline(self._layout.deadline_file, self._deadline)
            except (PgError, OSError) as exc:
                log.warning(
                    "pg_deadline_write_failed", msg="cannot write the deadline", error=str(exc)
                )

    async def _set_deadline_file(self, deadline: float | None) -> None:
        await self._host.write_deadline(self.layout.deadline_file, deadline)

    def _check_deadline(self) -> None:
        if self._deadline is not None and boottime() >= self._deadline:
            raise PgError("deadline", "the lease deadline has passed: not acting as primary")

    # ---------------------------------------------------------------- the Role API
    async def start_primary(self, ctx: RunContext) -> Outcome:
        return await self._locked("start_primary", lambda: self._start_primary(ctx))

    async def start_replica(self, ctx: RunContext, primary: PrimaryInfo | None) -> Outcome:
        async def run() -> Outcome:
            self.attach(ctx)
            if primary is None:
                return await self._standby_alone()
            return await self._become_replica(primary)

        return await self._locked("start_replica", run)

    async def promote(self, ctx: RunContext) -> Outcome:
        return await self._locked("promote", lambda: self._promote(ctx))

    async def demote(self, primary: PrimaryInfo | None = None) -> Outcome:
        return await self._locked("demote", lambda: self._demote(primary))

    async def set_sync_standbys(self, names: Sequence[str]) -> Outcome:
        """The replicas a synchronous primary waits for (``ANY 1``); empty: any replica."""

        async def run() -> Outcome:
            self._sync_names = tuple(sorted(set(names)))
            replica = self._role is Role.REPLICA
            if self._layout is None or self._role is None or (replica and not self._following):
                return Outcome.done("remembered for the next role change", changed=False)
            state = await self._inspect()
            if not state.running:
                return Outcome.done("remembered; not running", changed=False)
            settings = (
                self._replica_settings(self._following) if replica else self._primary_settings()
            )
            changed = await self._configure(settings)
            if changed:
                await self._reload()
            names_conf = cfg.sync_standby_names(self.spec.synchronous, self._sync_names)
            return Outcome.done(f"synchronous_standby_names = '{names_conf}'", changed=changed)

        return await self._locked("set_sync_standbys", run)

    async def status(self) -> ReplicationStatus:
        try:
            state = await self._inspect()
            if state.running:
                return await self._running_status()
            role = Role.REPLICA if state.standby or not state.exists else Role.PRIMARY
            why = await self._down_reason()
            if not state.exists:
                return ReplicationStatus(
                    role, None, None, None, f"no data yet: {why}", running=False, has_data=False
                )
            timeline, position = await self._control_position()
            detail = f"not running ({role} data on timeline {timeline} at least at "
            detail += f"{_lsn(position)}): {why}"
            return ReplicationStatus(role, position, timeline, None, detail, running=False)
        except PgError as exc:  # unknown state: claims neither data nor a role
            role = self._role or Role.REPLICA
            return ReplicationStatus(role, None, None, None, _msg(exc), False, False)
        except Exception as exc:  # never raise out of the Interpret
            log.exception("pg_status_failed", msg="PostgreSQL status failed")
            role = self._role or Role.REPLICA
            return ReplicationStatus(role, None, None, None, repr(exc), False, False)

    # ---------------------------------------------------------------- Interpret
    async def stop(self) -> Outcome:
        async def run() -> Outcome:
            if self._layout is None:
                return Outcome.done("never started", changed=False)
            stopped = await self._stop()
            return Outcome.done("stopped" if stopped else "already stopped", changed=stopped)

        return await self._locked("stop", run)

    async def observe(self) -> Observation:
        if self._layout is None:
            return Observation(WorkloadState.STOPPED, "not started by this agent", reason="absent")
        if self._error is not None:
            return Observation(WorkloadState.FAILED, _msg(self._error), reason=self._error.reason)
        try:
            state = await self._inspect()
            if not state.running:
                watchdog = await self._watchdog_state()
                if watchdog.get("reason") == "deadline":
                    return Observation(
                        WorkloadState.FAILED,
                        "killed by its watchdog at the lease deadline",
                        reason="deadline",
                    )
                if watchdog.get("reason") == "exited" and watchdog.get("returncode") not in (0,):
                    return Observation(
                        WorkloadState.FAILED,
                        f"postgres exited with {watchdog.get('returncode')}",
                        reason="crashed",
                    )
                return Observation(WorkloadState.STOPPED, "not running", reason="stopped")
            status = await self._running_status()
        except PgError as exc:
            return Observation(WorkloadState.FAILED, _msg(exc), reason=exc.reason)
        extra = {
            REPLICATION_EXTRA: status,
            "role": str(status.role),
            "position": status.position,
            "timeline": status.timeline,
            "lag_bytes": status.lag_bytes,
            "application_name": self.application_name,
        }
        pids = (state.pid,) if state.pid else ()
        return Observation(WorkloadState.RUNNING, status.detail, pids=pids, extra=extra)

    async def close(self) -> None:
        for pending in (self._checkpoint_task,):
            if pending is not None and not pending.done():
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(pending, 30)
        task = self._deadline_task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)

    # ---------------------------------------------------------------- plumbing
    async def _locked(self, what: str, action: Callable[[], Awaitable[Outcome]]) -> Outcome:
        async with self._lock:
            try:
                outcome = await action()
            except PgError as exc:
                self._error = exc
                self._prepared = self._written_conf = None
                log.warning(
                    f"postgres_{what}_failed",
                    msg=f"postgres {what} failed: {_msg(exc)}",
                    reason=exc.reason,
                    error=str(exc),
                )
                return Outcome.failed(f"{what}: {_msg(exc)}")
            except Exception as exc:
                self._error = PgError("internal", f"{type(exc).__name__}: {exc}")
                log.exception(f"postgres_{what}_failed", msg=f"postgres {what} failed: {exc!r}")
                return Outcome.failed(f"{what}: unexpected {type(exc).__name__}: {exc}")
            self._error = None
            # A call that changed nothing (the controller asks for the same role every
            # cycle while it waits, e.g. "demote" on a site that gave up) stays at debug:
            # at info it wrote the same line twice a second.
            emit = log.info if outcome.changed else log.debug
            emit(
                f"postgres_{what}",
                msg=f"postgres {what}: {outcome.message}",
                changed=outcome.changed,
            )
            return outcome

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

    # ---------------------------------------------------------------- primary
    async def _start_primary(self, ctx: RunContext) -> Outcome:
        self.attach(ctx)
        if ctx.deadline is not None:
            self._deadline = ctx.deadline.at
        self._check_deadline()
        layout = await self._prepare()
        state = await self._inspect()
        if state.standby:
            raise PgError(
                "is-replica",
                f"{layout.data_dir} holds a replica: promote() it instead of start_primary()",
            )
        self._token = ctx.fencing_token
        self._role = Role.PRIMARY
        messages = []
        if not state.exists:
            await self._check_port()  # before creating anything that could not start
            await self._initdb()
            messages.append("initialised a new cluster (data checksums on)")
        if state.running and not await self._supervised(state):
            await self._stop()
            messages.append("restarted an instance that ran without a watchdog")
            state = DataState(exists=True)
        if state.running:
            if await self._configure(self._primary_settings()):
                await self._reload()
                messages.append("configuration reloaded")
            await self._set_deadline_file(self._deadline)
        else:
            messages.append(await self._start(standby=False, role=self._primary_settings()))
        await self._bootstrap()
        if await self._record_term(ctx.fencing_token):
            messages.append(f"term {ctx.fencing_token} recorded")
        if not messages:
            return Outcome.done("primary already running", changed=False)
        return Outcome.done(f"primary on port {layout.port}: " + "; ".join(messages))

    async def _initdb(self) -> None:
        layout = self.layout
        parent = layout.data_dir.rsplit("/", 1)[0] or "/"
        if await self._host.owner(parent) is None:
            await self._host.make_dir(parent)
        started = time.monotonic()
        argv = [await self._tool("initdb"), "-D", layout.data_dir, "-U", self.spec.os_user]
        argv += ["--data-checksums", "-E", "UTF8", "--locale=C.UTF-8"]
        argv += ["--auth-local=peer", "--auth-host=scram-sha-256"]
        res = await self._host.run(argv, timeout=180)
        if not res.ok:
            raise PgError("initdb-failed", res.summary())
        self.timings["initdb"] = time.monotonic() - started

    async def _bootstrap(self) -> None:
        """Replication role (with the grants pg_rewind needs) and the term table."""
        repl = self.spec.replication_user
        password = "PASSWORD NULL"
        if not self._tls:
            current = await self._sql(
                f"SELECT coalesce(rolpassword, '') FROM pg_authid WHERE rolname = '{repl}'"
            )
            secret = await self._password()
            existing = current[0][0] if current else ""
            if not _verifies(existing, secret):
                password = f"PASSWORD '{cfg.scram_verifier(secret)}'"
            else:
                password = ""
        await self._sql(f"""
SET synchronous_commit = local;
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{repl}') THEN
    CREATE ROLE {repl} WITH LOGIN REPLICATION;
  END IF;
END $$;
ALTER ROLE {repl} WITH LOGIN REPLICATION {password};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {repl};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {repl};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {repl};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {repl};
GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_checkpoint() TO {repl};
DO $$ BEGIN
  IF current_setting('server_version_num')::int >= 150000 THEN
    EXECUTE 'GRANT pg_checkpoint TO {repl}';
  END IF;
END $$;
CREATE SCHEMA IF NOT EXISTS harmony;
CREATE TABLE IF NOT EXISTS harmony.term (
  token bigint NOT NULL, promoted_at timestamptz NOT NULL DEFAULT now());
CREATE UNIQUE INDEX IF NOT EXISTS term_one_row ON harmony.term ((true));
GRANT USAGE ON SCHEMA harmony TO PUBLIC;
GRANT SELECT ON harmony.term TO PUBLIC;
""")

    async def _record_term(self, token: int) -> bool:
        """Raise the recorded term to ``token``; refuse (and stop) if it is older."""
        rows = await self._sql(f"""
SET synchronous_commit = local;
BEGIN;
LOCK TABLE harmony.term IN EXCLUSIVE MODE;
SELECT coalesce((SELECT token FROM harmony.term), -1);
INSERT INTO harmony.term (token) SELECT {token} WHERE NOT EXISTS (SELECT FROM harmony.term);
UPDATE harmony.term SET token = {token}, promoted_at = now() WHERE token < {token};
COMMIT;
""")
        before = int(rows[0][0]) if rows else -1
        if before > token:
            await self._stop()
            raise PgError(
                "stale-token",
                f"the database records term {before}, newer than our token {token}: stopped",
            )
        return before != token

    async def _recorded_term(self) -> int | None:
        rows = await self._sql(
            "SELECT CASE WHEN to_regclass('harmony.term') IS NOT NULL THEN (xpath("
            "'/row/token/text()', query_to_xml('SELECT token FROM harmony.term', false, true,"
            " '')))[1]::text END"
        )
        value = rows[0][0] if rows and rows[0] else ""
        return int(value) if value.strip().lstrip("-").isdigit() else None

    # ---------------------------------------------------------------- promote
    async def _promote(self, ctx: RunContext) -> Outcome:
        self.attach(ctx)
        if ctx.deadline is not None:
            self._deadline = ctx.deadline.at
        self._check_deadline()
        if self._deadline is not None and self._deadline - boottime() < MIN_DEADLINE_LEFT:
            raise PgError("deadline", "too little of the lease is left to promote safely")
        await self._bin_dir()
        state = await self._inspect()
        if not (state.running and state.standby):  # a running replica needs nothing new
            await self._prepare()
        if not state.exists:
            raise PgError("absent", "no data directory to promote: start a replica first")
        if not state.standby:
            self._role = Role.PRIMARY
            outcome = await self._start_primary(ctx)
            return Outcome.done(f"already primary; {outcome.message}", changed=outcome.changed)
        token = ctx.fencing_token
        settings = self._replica_settings(self._following)
        if state.running and self._deadline is not None and not await self._supervised(state):
            await self._stop()
            state = DataState(exists=True, standby=True)
        if not state.running:
            await self._start(standby=True, role=settings)
        # From here on this instance may become writable: the watchdog enforces the deadline
        # before pg_promote() is even sent.
        self._role = Role.PRIMARY
        self._token = token
        await self._set_deadline_file(self._deadline)
        await self._signal_watchdog()
        # A replica already runs with the synchronous_standby_names it will need as primary
        # (set_sync_standbys), so its first commit as primary waits for a replica; if they
        # changed at the last moment, they are reloaded before the promotion.
        reload = "SELECT pg_reload_conf();" if await self._configure(settings) else ""
        started = time.monotonic()
        wait = max(1, int(self.spec.promote_timeout))
        try:
            rows = await self._sql(f"""
DO $$ BEGIN
  IF to_regclass('harmony.term') IS NOT NULL
     AND (SELECT max(token) FROM harmony.term) > {token} THEN
    RAISE EXCEPTION 'stale-token: the database records a term newer than {token}';
  END IF;
END $$;
{reload}
SELECT pg_promote(true, {wait});
""")
        except PgError as exc:
            if "stale-token" in str(exc):  # nothing was promoted: no deadline for a replica
                self._role, self._deadline = Role.REPLICA, None
                await self._set_deadline_file(None)
                raise PgError(
                    "stale-token",
                    f"the database records a term newer than our token {token}: not promoting",
                ) from None
            raise
        if not rows or rows[-1][0] != "t":
            raise PgError("promote-failed", f"pg_promote() did not finish within {wait}s")
        self.timings["promote"] = time.monotonic() - started
        self._following = None
        await self._configure(self._primary_settings())
        await self._record_term(token)
        await self._reload()
        self._checkpoint_soon()
        return Outcome.done(f"promoted in {self.timings['promote']:.2f}s: term {token}")

    def _checkpoint_soon(self) -> None:
        """pg_rewind reads a source's timeline from its control file, which a promoted server
        updates only at its next checkpoint: take one now, off the promotion's critical path
        (a rejoining node also asks for one when it finds none)."""

        async def checkpoint() -> None:
            try:
                await self._sql("CHECKPOINT")
            except PgError as exc:
                log.warning(
                    "pg_checkpoint_failed", msg="checkpoint after promotion failed", error=str(exc)
                )

        if self._checkpoint_task is None or self._checkpoint_task.done():
            self._checkpoint_task = asyncio.get_running_loop().create_task(checkpoint())

    # ---------------------------------------------------------------- replica
    async def _demote(self, primary: PrimaryInfo | None) -> Outcome:
        if primary is not None:
            return await self._become_replica(primary)
        layout = self.layout
        stopped = await self._stop()
        try:
            state = await self._inspect()
        except PgError as exc:
            if self._watched is not None:
                raise
            return Outcome.done(f"nothing of ours runs here ({_msg(exc)})", changed=False)
        if state.exists:
            await self._host.sh('touch -- "$1"', layout.standby_signal)
        self._role = Role.REPLICA
        self._deadline = None
        with contextlib.suppress(PgError, OSError):  # (nothing to clear where nothing ran)
            await self._set_deadline_file(None)
        return Outcome.done(
            "stopped; it will rejoin as a replica of the next primary", changed=stopped
        )

    async def _become_replica(self, primary: PrimaryInfo) -> Outcome:
        await self._bin_dir()
        state = await self._inspect()
        if not (state.running and state.standby):  # re-pointing a replica needs nothing new
            await self._prepare()
        layout = self.layout
        settings = self._replica_settings(primary)
        if primary.extra.get("pending"):
            # The next primary, not writable yet: only a running replica is pointed to it
            # (target_session_attrs=read-write keeps it from streaming before the
            # promotion); whether it can follow is checked once it is the primary.
            if not (state.running and state.standby):
                return Outcome.done(f"waiting for {_where(primary)} to be promoted", changed=False)
            changed = await self._configure(settings)
            if changed:
                await self._reload()
            self._following, self._role = None, Role.REPLICA
            return Outcome.done(f"pointed to {_where(primary)} (not promoted yet)", changed=changed)
        if state.running:
            if state.standby and (self._following == primary or await self._can_follow(primary)):
                changed = await self._configure(settings)
                if changed:
                    await self._reload()
                self._following, self._role = primary, Role.REPLICA
                what = "now following" if changed else "already following"
                return Outcome.done(f"{what} {_where(primary)}", changed=changed)
            await self._stop()
        self._role = Role.REPLICA
        self._deadline = None
        how: str
        if not state.exists:
            await self._basebackup(primary)
            how = "copied with pg_basebackup"
        elif await self._rewind(primary):
            how = "rejoined with pg_rewind"
        else:
            moved = await self._move_aside()
            await self._basebackup(primary)
            how = f"pg_rewind failed: old data moved to {moved}; copied with pg_basebackup"
        self._following = primary
        ready = await self._start(standby=True, role=settings)
        return Outcome.done(f"replica of {_where(primary)} on port {layout.port}: {how}; {ready}")

    async def _standby_alone(self) -> Outcome:
        """Start the local data as a standby following nobody yet: it replays the WAL it
        has (a crashed primary recovers) and reports how far that reaches, so the
        controller can compare it with the other sites before anyone is promoted."""
        layout = await self._prepare()
        state = await self._inspect()
        if not state.exists:
            return Outcome.done("no data here and no primary to copy from yet", changed=False)
        if state.running and state.standby:
            self._role = Role.REPLICA
            return Outcome.done("standby already running", changed=False)
        if state.running:
            await self._stop()
        self._role = Role.REPLICA
        self._deadline = None
        ready = await self._start(standby=True, role=self._replica_settings(self._following))
        return Outcome.done(f"standby on port {layout.port} (following nobody yet): {ready}")

    async def _can_follow(self, primary: PrimaryInfo) -> bool:
        """Can this running replica switch to ``primary`` without a rewind?

        Yes when the new primary is on our timeline, or its history shows our timeline
        forking off at or after the last WAL we received (as Patroni checks).
        """
        try:
            mine = await self._sql(
                "SELECT coalesce((SELECT received_tli FROM pg_stat_wal_receiver),"
                " (SELECT NULLIF(min_recovery_end_timeline, 0) FROM pg_control_recovery()),"
                " (SELECT timeline_id FROM pg_control_checkpoint())),"
                " greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) - '0/0'"
            )
            my_tli, my_pos = int(mine[0][0]), int(float(mine[0][1]))
            remote = cfg.conninfo(
                self._replication_params(
                    primary, application_name="harmony-agent", dbname="postgres"
                )
            )
            theirs = await self._sql(
                "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                conninfo=remote,
            )
            their_tli = int(theirs[0][0])
            if their_tli == my_tli:
                return True
            if their_tli < my_tli:
                return False
            history = await self._sql(
                "SELECT replace(convert_from(pg_read_binary_file("
                f"'pg_wal/{their_tli:08X}.history'), 'UTF8'), E'\\n', '|')",
                conninfo=remote,
            )
            entries = cfg.parse_history(history[0][0].replace("|", "\n"))
        except (PgError, ValueError, IndexError) as exc:
            log.info(
                "pg_rewind_assumed",
                msg="cannot tell whether the replica can follow; will rewind",
                error=str(exc),
            )
            return False
        for parent, switch in entries:
            if parent == my_tli:
                return my_pos <= switch
        return False

    async def _rewind(self, primary: PrimaryInfo) -> bool:
        source = cfg.conninfo(
            self._replication_params(primary, application_name="harmony-rewind", dbname="postgres")
        )
        started = time.monotonic()
        await self._source_checkpointed(source)
        argv = [await self._tool("pg_rewind"), "--target-pgdata", self.layout.data_dir]
        argv += ["--source-server", source]
        major = await self._major()
        if major.isdigit() and int(major) >= 15:
            # A crashed former primary is first recovered by pg_rewind in single-user mode:
            # with our configuration (not the data directory's initdb defaults), so that
            # wal_keep_size keeps the WAL pg_rewind then needs to find the common checkpoint.
            argv += ["--config-file", self.layout.config_file]
        res = await self._host.run(argv, timeout=self.spec.basebackup_timeout)
        self.timings["rewind"] = time.monotonic() - started
        if not res.ok:
            log.warning("pg_rewind failed", error=res.summary(), output=res.stdout[-2000:])
            self.last_rewind_error = res.summary()
            return False
        self.last_rewind_error = None
        return True

    async def _source_checkpointed(self, source: str) -> None:
        """Make sure the source's control file shows its current timeline (see promote)."""
        check = (
            "SELECT (SELECT timeline_id FROM pg_control_checkpoint()) = ('x' || "
            "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
        )
        try:
            if (await self._sql(check, conninfo=source))[0][0] != "t":
                log.info(
                    "pg_checkpoint_requested",
                    msg="asking the new primary for a checkpoint before pg_rewind",
                )
                await self._sql("CHECKPOINT", conninfo=source)
        except (PgError, IndexError) as exc:
            log.warning(
                "pg_source_timeline_unknown",
                msg="cannot check the source's checkpoint timeline",
                error=str(exc),
            )

    async def _move_aside(self) -> str:
        data = self.layout.data_dir
        target = f"{data}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1000000}"
        res = await self._host.sh('mv -- "$1" "$2"', data, target)
        if not res.ok:
            raise PgError("unwritable", f"cannot move {data} aside: {res.summary()}")
        keep = self.spec.keep_replaced_data_dirs
        prune = (
            'ls -d -- "$1".replaced-* 2>/dev/null | sort -r | tail -n +$(($2 + 1)) '
            '| while read -r old; do rm -rf -- "$old"; done'
        )
        await self._host.sh(prune, data, str(keep), timeout=120)
        return target

    async def _basebackup(self, primary: PrimaryInfo) -> None:
        layout = self.layout
        parent = layout.data_dir.rsplit("/", 1)[0] or "/"
        if await self._host.owner(parent) is None:
            await self._host.make_dir(parent)
        source = cfg.conninfo(
            self._replication_params(primary, application_name="harmony-basebackup")
        )
        started = time.monotonic()
        argv = [await self._tool("pg_basebackup"), "-D", layout.data_dir, "-X", "stream"]
        argv += ["-c", "fast", "-w", "-d", source]
        res = await self._host.run(argv, timeout=self.spec.basebackup_timeout)
        if not res.ok:
            raise PgError(
                "basebackup-failed", f"pg_basebackup from {_where(primary)}: {res.summary()}"
            )
        self.timings["basebackup"] = time.monotonic() - started

    # ---------------------------------------------------------------- status
    async def _running_status(self) -> ReplicationStatus:
        rows = await self._sql(_STATUS_SQL)
        (
            recovery,
            position,
            received,
            primary_tli,
            received_tli,
            min_tli,
            checkpoint_tli,
            latest_end,
            receiver,
            guc_token,
            term,
            replicas,
            started,
        ) = (rows[0] + [""] * 13)[:13]
        pos = _int(position)
        token = term or guc_token or "?"
        if recovery != "t":
            timeline = _int(primary_tli)
            detail = f"primary on timeline {timeline} at {_lsn(pos)}, term {token}"
            detail += f"; replicas: {replicas}" if replicas else "; no replica connected"
            return ReplicationStatus(Role.PRIMARY, pos, timeline, 0, detail)
        timeline = _int(received_tli) or _int(min_tli) or _int(checkpoint_tli)
        # Only the WAL receiver knows the timeline being received, and the control file
        # catches up lazily: while nothing streams, a running replica could report an older
        # timeline than the one it replayed. It never goes back without a restart.
        seen_start, seen = self._replica_timeline
        if seen_start == started and seen is not None and (timeline or 0) < seen:
            timeline = seen
        self._replica_timeline = (started, timeline)
        ahead = [v for v in (_int(latest_end), _int(received)) if v is not None]
        lag = max(0, max(ahead) - pos) if ahead and pos is not None else None
        detail = (
            f"replica on timeline {timeline}, replayed {_lsn(pos)}, received "
            f"{_lsn(_int(received))}, "
            + (f"{receiver}" if receiver else "not streaming")
            + f", lag {lag if lag is not None else '?'} bytes, following term {token}"
        )
        # What a promotion would reach: it replays everything received first.
        reach = max((v for v in (pos, _int(received)) if v is not None), default=None)
        return ReplicationStatus(Role.REPLICA, reach, timeline, lag, detail)


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


# ``PostgresSpec.interpret`` is annotated with this class's name only (the modules import each
# other); naming it in the spec's module lets ``scores.check.interpret_class`` resolve it, so
# ``check`` and the Application's validation know what this Score's Interpret is.
_spec_module.PostgresInterpret = PostgresInterpret  # type: ignore[attr-defined]
