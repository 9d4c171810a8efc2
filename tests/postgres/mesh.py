"""PostgreSQL on three netns sites, driven by real agents: the stage of the role tests.

Each site runs its nats-server, its agent and (under the agent) its PostgreSQL, all in the
site's network namespace; replication flows over the data network (``10.200.0.x``, what a
cut takes down), and the test reaches every server through the management links (never
cut), the way a monitoring host would. Used by ``test_failover.py`` and
``bench/postgres_failover.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psycopg
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError

from mesh.names import STATE_BUCKET, instance_key
from mesh.trust import SiteCA, cert_pem
from tests.failover.conftest import Stage
from tests.harness.agents import AgentProcess
from tests.harness.wait import eventually
from tests.postgres.client import boottime, multihost
from tests.postgres.conftest import os_user

APP = "ledger"
SITES = ("site-a", "site-b", "site-c")
PORT = 5432


def pg_application(
    base: Path, stage: Stage, *, max_lag: int | str | None = None, **score: Any
) -> dict[str, Any]:
    """The Application: a synchronous PostgreSQL over TLS with per-site addresses."""
    certs = base / "certs"
    failover: dict[str, Any] = {"strategy": "AbsoluteConsistency"}
    if max_lag is not None:
        failover["maximum_lag_on_failover"] = max_lag
    body: dict[str, Any] = {
        "kind": "PostgreSQL",
        "port": PORT,
        "listen": "*",
        "synchronous": True,
        "os_user": os_user(),
        "tls": {
            "ca_file": str(certs / "bundle.pem"),
            "cert_file": str(certs / "node.crt"),
            "key_file": str(certs / "node.key"),
        },
        "hba": ["host all all 0.0.0.0/0 trust"],
        "sites": {
            site: {"advertise": stage.sites[site].data_ip, "run_dir": str(base / site)}
            for site in SITES
        },
        "stop_timeout": "10s",
        "start_timeout": "30s",
        "promote_timeout": "10s",
        "basebackup_timeout": "60s",
        "parameters": {"wal_keep_size": "64MB", "shared_buffers": "16MB"},
        **score,
    }
    return {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": APP},
        "spec": {
            "trait": "stateful",
            "failover": failover,
            "placement": {"sites": list(SITES)},
            "score": body,
        },
    }


def make_certs(base: Path, ips: list[str]) -> None:
    """One site CA and one node certificate naming every data address (CN = replicator)."""
    certs = base / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    ca = SiteCA.create("site-a", certs / "ca")
    (certs / "bundle.pem").write_bytes(cert_pem(ca.cert))
    cert, key = ca.issue("replicator", dns=["localhost"], ips=ips)
    (certs / "node.crt").write_bytes(cert_pem(cert))
    (certs / "node.key").write_bytes(key)
    (certs / "node.key").chmod(0o600)


async def _quiet(exc: Exception) -> None:
    """A killed or cut site's server: the reader tries the next site (no traceback spam)."""
    del exc


async def _quiet_event() -> None:
    return None


@dataclass
class PgMesh:
    """The stage plus PostgreSQL-aware helpers."""

    stage: Stage
    base: Path
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    double: list[str] = field(default_factory=list)
    """Moments two servers were seen accepting writes at once (must stay empty)."""
    _readers: dict[str, Client] = field(default_factory=dict)

    # --- addresses ---------------------------------------------------------------------

    def host(self, site: str) -> str:
        return self.stage.sites[site].mgmt_ip

    def dsn(self, site: str, timeout: int = 2) -> str:
        return (
            f"host={self.host(site)} port={PORT} dbname=postgres user={os_user()} "
            f"connect_timeout={timeout}"
        )

    def multihost(self) -> str:
        return multihost([(self.host(s), PORT) for s in SITES], user=os_user())

    # --- agents --------------------------------------------------------------------------

    def start_agents(self) -> None:
        for site in SITES:
            self.agents[site] = self.stage.agent(site)

    def restart(self, site: str) -> None:
        """Start a killed agent again (same config, same state directory)."""
        agent = self.agents[site]
        assert not agent.running()
        self.stage.start(agent)

    def kill_agent(self, site: str) -> None:
        self.agents[site].kill()

    def kill_postgres(self, site: str) -> None:
        """SIGKILL the site's watchdog and postmaster (and so every backend)."""
        state = self.base / site / "watchdog.json"
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(state.read_text())
            for key in ("watchdog", "postgres"):
                pid = data.get(key)
                if isinstance(pid, int) and pid > 0:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def kill_site(self, site: str) -> None:
        """kill -9 of everything the site runs: agent, postgres, nats-server."""
        self.kill_agent(site)
        self.kill_postgres(site)
        node = self.stage.sites[site].nats
        assert node is not None
        node.kill()

    def restart_site(self, site: str) -> None:
        node = self.stage.sites[site].nats
        assert node is not None
        node.start()
        self.restart(site)

    async def stop_wal_receiver(self, site: str) -> int:
        """SIGSTOP the replica's WAL receiver (it lags from now on); its pid."""
        async with await psycopg.AsyncConnection.connect(self.dsn(site), autocommit=True) as c:
            cur = await c.execute("SELECT pid FROM pg_stat_wal_receiver")
            row = await cur.fetchone()
        assert row is not None, f"{site} is not streaming"
        os.kill(int(row[0]), signal.SIGSTOP)
        return int(row[0])

    async def fill(self, site: str, size: int) -> None:
        """Write about ``size`` bytes of WAL on the primary at ``site``."""
        async with await psycopg.AsyncConnection.connect(self.dsn(site), autocommit=True) as c:
            await c.execute("CREATE TABLE IF NOT EXISTS harmony_test.filler (pad text)")
            await c.execute("ALTER TABLE harmony_test.filler ALTER pad SET STORAGE EXTERNAL")
            await c.execute(  # uncompressed: every byte goes to the WAL
                "INSERT INTO harmony_test.filler SELECT repeat(md5(g::text), 64) "
                f"FROM generate_series(1, {size // 2048 + 1}) g"
            )

    async def lags(self, site: str, primary: str, size: int) -> None:
        """The mesh saw ``site`` more than ``size`` bytes behind ``primary``."""

        async def probe() -> bool:
            behind, top = await self.role(site), await self.role(primary)
            pos, end = behind.get("position"), top.get("position")
            return isinstance(pos, int) and isinstance(end, int) and end - pos > size

        await eventually(probe, timeout=30, interval=0.25, what=f"{site} to lag")

    # --- what the mesh says ----------------------------------------------------------------

    async def report(self, site: str) -> dict[str, Any] | None:
        """The site's instance report, read through whichever site's server answers (the
        test's shared connection may be on a site that is cut off)."""
        key = instance_key(APP, site, "n1")
        last: Exception | None = None
        for via in SITES:
            try:
                nc = self._readers.get(via)
                if nc is None or nc.is_closed:
                    nc = await nats.connect(
                        self.stage.sites[via].url,
                        connect_timeout=1,
                        error_cb=_quiet,
                        disconnected_cb=_quiet_event,
                    )
                    self._readers[via] = nc
                kv = await nc.jetstream(timeout=1).key_value(STATE_BUCKET)
                entry = await kv.get(key)
            except KeyNotFoundError:
                return None
            except Exception as exc:  # unreachable, no JetStream leader there: next site
                last = exc
                continue
            data: dict[str, Any] = json.loads(entry.value or b"{}")
            return data
        raise AssertionError(f"no site's server answered: {last!r}")

    async def close(self) -> None:
        for nc in self._readers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2)  # (a server may be cut off)

    async def reports(self) -> dict[str, dict[str, Any]]:
        out = {}
        for site in self.agents:
            report = await self.report(site)
            if report is not None:
                out[site] = report
        return out

    async def role(self, site: str) -> dict[str, Any]:
        """The ``replication`` block of the site's report (empty while none)."""
        rep = (await self.report(site) or {}).get("replication")
        return rep if isinstance(rep, dict) else {}

    async def server_role(self, site: str) -> tuple[bool, int, int] | None:
        """(in recovery, timeline, recorded term) asked of the server itself."""
        try:
            async with await psycopg.AsyncConnection.connect(
                self.dsn(site, 1), autocommit=True
            ) as conn:
                cur = await conn.execute(
                    "SELECT pg_is_in_recovery(), (SELECT timeline_id FROM "
                    "pg_control_checkpoint()), coalesce((SELECT token FROM harmony.term), -1)"
                )
                row = await cur.fetchone()
        except (psycopg.Error, OSError):
            return None
        return (bool(row[0]), int(row[1]), int(row[2])) if row else None

    async def primary(
        self, *, not_site: str | None = None, timeout: float = 60.0
    ) -> tuple[str, int]:
        """(site, token) of the one server that accepts writes, once its agent reports it
        as primary and a write through the multi-host string reaches it."""

        async def probe() -> tuple[str, int] | None:
            writable = []
            for site in SITES:
                found = await self.server_role(site)
                if found is not None and not found[0]:
                    writable.append((site, found[2]))
            if len(writable) > 1:
                self.double.append(f"{writable} at {boottime():.3f}")
                raise AssertionError(f"two servers accept writes: {writable}")
            if len(writable) != 1 or writable[0][0] == not_site:
                return None
            site = writable[0][0]
            report = await self.report(site) or {}
            rep = report.get("replication") or {}
            token = report.get("token")
            if rep.get("role") != "primary" or not rep.get("running"):
                return None
            return (site, token) if isinstance(token, int) else None

        return await eventually(probe, timeout=timeout, interval=0.2, what="one primary")

    async def replica_of(self, site: str, timeline: int, timeout: float = 60.0) -> None:
        """``site`` streams as a replica on ``timeline`` (rejoined without manual steps)."""

        async def probe() -> bool:
            found = await self.server_role(site)
            rep = await self.role(site)
            return (
                found is not None
                and found[0]
                and rep.get("role") == "replica"
                and rep.get("timeline") == timeline
                and "streaming" in str(rep.get("detail"))
            )

        await eventually(probe, timeout=timeout, interval=0.25, what=f"{site} replica on tl")

    async def timeline(self, site: str) -> int:
        async with await psycopg.AsyncConnection.connect(self.dsn(site), autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])


@dataclass(frozen=True)
class Accept:
    site: str
    token: int
    acked: float


@dataclass
class Probe:
    """Writes to every site's server directly, in parallel, and records each acknowledged
    write with the term that wrote it: two sites whose accepting windows overlap were both
    primaries at once. The probe commits with ``synchronous_commit = local``: it measures
    when a server accepts writes at all (fencing), not whether a replica confirmed them (with
    synchronous replication on three sites two primaries could hardly both get a replica's
    confirmation, which would hide a fencing failure)."""

    mesh: PgMesh
    interval: float = 0.05
    accepts: list[Accept] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def prepare(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.mesh.multihost(), autocommit=True
        ) as conn:
            await conn.execute("SET synchronous_commit = local")
            await conn.execute("CREATE SCHEMA IF NOT EXISTS harmony_test")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS harmony_test.probe (site text, token bigint, "
                "at timestamptz DEFAULT clock_timestamp())"
            )

    def start(self) -> None:
        self._stop.clear()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(site)) for site in SITES]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 30)

    async def _run(self, site: str) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = await asyncio.wait_for(
                        psycopg.AsyncConnection.connect(self.mesh.dsn(site, 1), autocommit=True),
                        3,
                    )
                    await conn.execute("SET synchronous_commit = local")
                cur = await asyncio.wait_for(
                    conn.execute(
                        "INSERT INTO harmony_test.probe (site, token) VALUES "
                        "(%s, (SELECT token FROM harmony.term)) RETURNING token",
                        (site,),
                    ),
                    5,
                )
                row = await cur.fetchone()
                acked = boottime()
                if row is not None:
                    self.accepts.append(Accept(site, int(row[0]), acked))
            except (psycopg.Error, OSError, TimeoutError):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 1)
                conn = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)

    def windows(self) -> dict[tuple[str, int], tuple[float, float]]:
        """(site, term) -> (first, last) acknowledgement."""
        out: dict[tuple[str, int], tuple[float, float]] = {}
        for a in self.accepts:
            first, last = out.get((a.site, a.token), (a.acked, a.acked))
            out[(a.site, a.token)] = (min(first, a.acked), max(last, a.acked))
        return out

    def overlaps(self) -> list[str]:
        """Every pair of windows of different sites that share an instant."""
        found = []
        items = sorted(self.windows().items(), key=lambda kv: kv[1][0])
        for i, (ka, (a0, a1)) in enumerate(items):
            for kb, (b0, b1) in items[i + 1 :]:
                if ka[0] != kb[0] and b0 <= a1 and a0 <= b1:
                    found.append(f"{ka} accepted {a0:.3f}-{a1:.3f}, {kb} {b0:.3f}-{b1:.3f}")
        return found

    def describe(self) -> str:
        return "; ".join(
            f"{site}#{token}: {a0:.2f}-{a1:.2f}"
            for (site, token), (a0, a1) in sorted(self.windows().items(), key=lambda kv: kv[1])
        )


async def wait_until(seconds: float) -> None:
    """Let time pass (a fault that must last a while), as a poll with a deadline."""
    end = time.monotonic() + seconds
    await eventually(lambda: time.monotonic() >= end, timeout=seconds + 5, interval=0.1)
