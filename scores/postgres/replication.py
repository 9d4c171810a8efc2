"""Role changes of the PostgreSQL Interpret: the first primary (initdb), promotion with the
fencing token, demotion, a replica following a primary (pg_rewind or pg_basebackup), and the
replication status a replica reports.

``PgReplication`` sits between ``PgServer`` (the server plumbing it drives) and
``PostgresInterpret`` (which serialises these calls and turns errors into values).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import structlog

from scores.base import (
    Outcome,
    PrimaryInfo,
    ReplicationStatus,
    Role,
    RunContext,
)
from scores.postgres import config as cfg
from scores.postgres.host import PgError, boottime
from scores.postgres.server import (
    _STATUS_SQL,
    MIN_DEADLINE_LEFT,
    DataState,
    PgServer,
    _int,
    _lsn,
    _msg,
    _verifies,
    _where,
)

log = structlog.get_logger("scores.postgres")


class PgReplication(PgServer):
    """Primary, promotion, replica and status: each raises ``PgError`` on failure."""

    if TYPE_CHECKING:

        def attach(self, ctx: RunContext) -> None: ...

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
