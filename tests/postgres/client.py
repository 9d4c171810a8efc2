"""Client-side tools for PostgreSQL failover tests: a writer of increasing ids and a checker.

The writer goes through a libpq multi-host connection string with
``target_session_attrs=read-write``, exactly as an application would, and records every id
whose INSERT was *acknowledged* (the commit returned). After any sequence of faults,
``missing_ids(server, writer.acked_ids)`` must be empty on the final primary (and, with
``synchronous: true``, on any replica that was synchronous when the write was acknowledged).

Used by this package's tests and meant for the failover tests and ``bench/`` (the lead's):

    writer = Writer(multihost([("10.0.0.1", 5432), ("10.0.0.2", 5432)]))
    await writer.prepare()
    task = writer.start()                  # writes until stop()
    ...faults...
    await writer.stop()
    assert await missing_ids(conninfo_of_final_primary, writer.acked_ids) == []
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import psycopg

TABLE = "harmony_test.acked"


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def multihost(
    servers: Sequence[tuple[str, int]],
    *,
    user: str = "postgres",
    dbname: str = "postgres",
    connect_timeout: int = 2,
    **params: str | int,
) -> str:
    """``host=a,b port=1,2 ... target_session_attrs=read-write``: the string for clients."""
    hosts = ",".join(host for host, _ in servers)
    ports = ",".join(str(port) for _, port in servers)
    extra = " ".join(f"{k}={v}" for k, v in params.items())
    return (
        f"host={hosts} port={ports} dbname={dbname} user={user} "
        f"target_session_attrs=read-write connect_timeout={connect_timeout} {extra}"
    ).strip()


@dataclass(frozen=True)
class Ack:
    id: int
    port: int
    """The server port that acknowledged (``inet_server_port()``)."""
    sent: float
    """CLOCK_BOOTTIME just before the INSERT was sent."""
    acked: float
    """CLOCK_BOOTTIME when the commit returned."""


@dataclass
class Writer:
    """Writes ids 1, 2, 3... one autocommit INSERT each, reconnecting after any error."""

    conninfo: str
    interval: float = 0.0
    acks: list[Ack] = field(default_factory=list)
    failures: int = 0
    last_error: str | None = None
    next_id: int = 1
    _conn: psycopg.AsyncConnection[tuple[int]] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def acked_ids(self) -> list[int]:
        return [ack.id for ack in self.acks]

    async def prepare(self) -> None:
        """Create the table on the current primary (synchronous_commit local: DDL only)."""
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            await conn.execute("SET synchronous_commit = local")
            await conn.execute("CREATE SCHEMA IF NOT EXISTS harmony_test")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigint PRIMARY KEY, "
                "port int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )

    async def write_one(self, timeout: float = 10.0) -> Ack | None:
        """Try the next id once; the Ack if the commit was acknowledged."""
        ident = self.next_id
        self.next_id += 1
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
            sent = boottime()
            cursor = await asyncio.wait_for(
                self._conn.execute(
                    f"INSERT INTO {TABLE} (id, port) VALUES (%s, inet_server_port()) "
                    "RETURNING port",
                    (ident,),
                ),
                timeout,
            )
            row = await cursor.fetchone()
            acked = boottime()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}".strip()
            await self._drop()
            return None
        ack = Ack(ident, int(row[0]) if row else -1, sent, acked)
        self.acks.append(ack)
        return ack

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def run(self, *, max_ids: int = 1_000_000, max_seconds: float = 300.0) -> None:
        """Write until ``stop()``, ``max_ids`` attempts or ``max_seconds`` (bounded loop)."""
        end = time.monotonic() + max_seconds
        while not self._stop.is_set() and self.next_id <= max_ids and time.monotonic() < end:
            ack = await self.write_one()
            pause = self.interval if ack is not None else max(self.interval, 0.05)
            if pause:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause)
        await self._drop()

    def start(self, **limits: float) -> asyncio.Task[None]:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self.run(**limits))  # type: ignore[arg-type]
        return self._task

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    async def wait_for_acks(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` more ids than now are acknowledged (the writer must be running)."""
        target = len(self.acks) + count
        end = time.monotonic() + timeout
        while len(self.acks) < target:
            if time.monotonic() > end:
                raise AssertionError(
                    f"only {len(self.acks)} of {target} writes acknowledged; "
                    f"last error: {self.last_error}"
                )
            await asyncio.sleep(0.02)


async def missing_ids(conninfo: str, ids: Iterable[int]) -> list[int]:
    """Which of ``ids`` the server at ``conninfo`` does not have (any role, read only)."""
    wanted = sorted(set(ids))
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cursor = await conn.execute(f"SELECT id FROM {TABLE} WHERE id = ANY(%s)", (wanted,))
        present = {int(row[0]) for row in await cursor.fetchall()}
    return [ident for ident in wanted if ident not in present]


async def query(conninfo: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    """One statement, autocommit; the rows (empty for statements without a result)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cursor = await conn.execute(sql, args or None)  # type: ignore[arg-type]
        return list(await cursor.fetchall()) if cursor.description else []
