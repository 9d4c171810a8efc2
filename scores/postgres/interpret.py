"""The PostgreSQL Interpret: one instance playing the role the controller gives it.

Every public method returns a value (``Outcome``, ``Observation``, ``ReplicationStatus``) and
never raises for a host's or a database's bad day. Role changes are serialised by a lock;
``status``/``observe`` only read.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Sequence
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
from scores.postgres.config import Layout
from scores.postgres.host import PgError, PgHost
from scores.postgres.replication import PgReplication
from scores.postgres.server import _lsn, _msg
from scores.postgres.spec import PostgresSite, PostgresSpec
from topologies.capabilities import HostShell, RemoteShell

log = structlog.get_logger("scores.postgres")


class PostgresInterpret(PgReplication, ReplicatedInterpret):
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


# ``PostgresSpec.interpret`` is annotated with this class's name only (the modules import each
# other); naming it in the spec's module lets ``scores.check.interpret_class`` resolve it, so
# ``check`` and the Application's validation know what this Score's Interpret is.
_spec_module.PostgresInterpret = PostgresInterpret  # type: ignore[attr-defined]
