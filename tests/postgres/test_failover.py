"""Replicated PostgreSQL under real agents on three netns sites: no acknowledged write lost.

A client writes increasing ids through the libpq multi-host string
(``target_session_attrs=read-write``) with ``synchronous: true`` and records each
acknowledged id; a probe writes to every site's server directly and records when each
accepted. Through the faults, every acknowledged id must be on the final primary and no two
sites' accepting windows may overlap; every former primary must come back as a replica of
the new one, on its timeline, without a manual step.

``make test`` runs the scenario once; ``make soak`` (``HARMONY_SOAK_RUNS=25``) five times.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import tests.failover.conftest as fo
from tests.failover.conftest import Stage, mesh_ready, precreate_r3
from tests.harness.netns import Sites
from tests.harness.wait import eventually
from tests.postgres.client import Writer, missing_ids
from tests.postgres.conftest import postgres_skip_reason
from tests.postgres.mesh import APP, SITES, PgMesh, Probe, make_certs, pg_application

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(900)]

TTL = float(os.environ.get("HARMONY_PG_TTL", "3"))
SOAK = int(os.environ.get("HARMONY_SOAK_RUNS", "1"))
RUNS = max(1, SOAK // 5)
"""``make test`` (HARMONY_SOAK_RUNS=3): once; ``make soak`` (25): five times."""


@pytest.fixture
def pg_base(require_netns: None) -> Iterator[Path]:
    reason = postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="hpg", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        if not os.environ.get("HARMONY_KEEP_PG"):
            import shutil

            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def pg(
    netns_sites: Sites, tmp_path: Path, pg_base: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[PgMesh]:
    """Three netns sites with an agent each (``tests/failover``'s stage, ttl ``TTL``)."""
    monkeypatch.setattr(fo, "TTL", TTL)
    stage = Stage(netns_sites, tmp_path, tmp_path / "history.txt")
    await mesh_ready(netns_sites)
    await precreate_r3(netns_sites)
    make_certs(pg_base, [netns_sites[s].data_ip for s in SITES])
    mesh = PgMesh(stage, pg_base)
    try:
        mesh.start_agents()
        await stage.all_ready()
        yield mesh
    finally:
        for agent in mesh.agents.values():
            if agent.running():
                agent.signal(signal.SIGCONT)
        await mesh.close()
        await stage.close()
        for site in SITES:  # the agents are gone; their databases are not
            mesh.kill_postgres(site)


async def _up(pg: PgMesh, **app: object) -> tuple[str, int]:
    await pg.stage.put(pg_application(pg.base, pg.stage, **app))  # type: ignore[arg-type]
    first = await pg.primary(timeout=120)
    for site in SITES:
        if site != first[0]:
            await pg.replica_of(site, 1, timeout=120)
    return first


async def _rejoined(pg: PgMesh, old: str, new: str) -> None:
    timeline = await pg.timeline(new)
    await pg.replica_of(old, timeline, timeout=90)


async def _check(pg: PgMesh, writer: Writer, probe: Probe) -> None:
    await writer.stop()
    await probe.stop()
    final, token = await pg.primary(timeout=30)
    found = await pg.server_role(final)
    assert found is not None and found[2] == token, f"harmony.term on {final}: {found}"
    assert writer.acks, writer.last_error
    lost = await missing_ids(pg.dsn(final), writer.acked_ids)
    assert lost == [], f"acknowledged ids missing on {final}: {lost[:20]}"
    assert probe.overlaps() == [], probe.describe()
    assert pg.double == []


@contextlib.asynccontextmanager
async def _writing(pg: PgMesh) -> AsyncIterator[tuple[Writer, Probe]]:
    """The client writer (multi-host, synchronous) and the per-site probe, stopped even
    when the test fails (no task may outlive the test's event loop)."""
    writer = Writer(pg.multihost(), interval=0.02)
    await writer.prepare()
    probe = Probe(pg)
    await probe.prepare()
    writer.start(max_seconds=900)
    probe.start()
    try:
        yield writer, probe
    finally:
        with contextlib.suppress(Exception):
            await writer.stop()
        with contextlib.suppress(Exception):
            await probe.stop()


@pytest.mark.parametrize("run", range(RUNS))
async def test_no_acknowledged_write_is_lost_through_faults(pg: PgMesh, run: int) -> None:
    primary, token = await _up(pg)
    async with _writing(pg) as (writer, probe):
        await _faults(pg, writer, probe, primary, token)


async def _faults(pg: PgMesh, writer: Writer, probe: Probe, primary: str, token: int) -> None:
    await writer.wait_for_acks(20)
    faults = 0

    # 1-2: kill -9 of the primary's agent and its postgres; the agent comes back and the
    # former primary rejoins the new one (pg_rewind).
    old = primary
    pg.kill_agent(old)
    pg.kill_postgres(old)
    primary, token2 = await pg.primary(not_site=old, timeout=60)
    assert token2 > token
    await writer.wait_for_acks(20)
    pg.restart(old)
    await _rejoined(pg, old, primary)
    faults += 2

    # 3-4: cut the primary's site; heal: the old primary rejoins.
    old, token = primary, token2
    pg.stage.sites.cut(old)
    primary, token2 = await pg.primary(not_site=old, timeout=60)
    assert token2 > token
    await writer.wait_for_acks(20)
    pg.stage.sites.heal(old)
    await _rejoined(pg, old, primary)
    faults += 2

    # 5-6: SIGSTOP of the primary's agent (its postgres keeps running until the watchdog
    # fences it at the lease deadline); SIGCONT: demoted and rejoined.
    old, token = primary, token2
    pg.agents[old].signal(signal.SIGSTOP)
    primary, token2 = await pg.primary(not_site=old, timeout=60)
    assert token2 > token
    await writer.wait_for_acks(20)
    pg.agents[old].signal(signal.SIGCONT)
    await _rejoined(pg, old, primary)
    faults += 2

    # 7: planned failover to another site.
    old, token = primary, token2
    target = next(s for s in SITES if s != old)
    reply = await pg.stage.command(f"harmony.cmd.app.{APP}.failover", {"to": target})
    assert reply["ok"], reply
    primary, token2 = await pg.primary(not_site=old, timeout=30)
    assert primary == target and token2 > token
    await writer.wait_for_acks(20)
    await _rejoined(pg, old, primary)
    faults += 1

    # 8-9: one replica lags (its WAL receiver stopped, 2 MiB more written: beyond
    # maximum_lag_on_failover) when the primary's whole site dies (agent, postgres and
    # nats-server): the up-to-date replica is promoted, never the lagging one; the site
    # comes back and rejoins.
    old, token = primary, token2
    lagging, current = (s for s in SITES if s != old)
    receiver = await pg.stop_wal_receiver(lagging)
    await pg.fill(old, 2 * 1024 * 1024)
    await pg.lags(lagging, old, 2 * 1024 * 1024)
    pg.kill_site(old)
    primary, token2 = await pg.primary(not_site=old, timeout=60)
    assert primary == current, f"{primary} promoted while {current} was up to date"
    assert token2 > token
    os.kill(receiver, signal.SIGCONT)
    await writer.wait_for_acks(20)
    pg.restart_site(old)
    await _rejoined(pg, old, primary)
    await _rejoined(pg, lagging, primary)
    faults += 2

    # 10: planned failover back to where the primary was.
    old, token = primary, token2
    reply = await pg.stage.command(f"harmony.cmd.app.{APP}.failover", {"to": lagging})
    assert reply["ok"], reply
    primary, token2 = await pg.primary(not_site=old, timeout=30)
    assert primary == lagging and token2 > token
    await writer.wait_for_acks(20)
    faults += 1

    await _check(pg, writer, probe)
    assert faults >= 10
    print(f"{len(writer.acks)} acknowledged writes; windows: {probe.describe()}")


async def test_bad_input_is_a_clear_error_and_the_application_runs_where_it_can(
    pg: PgMesh,
) -> None:
    """site-a's data directory belongs to someone else, site-b's port is taken, site-c has
    no PostgreSQL binaries: each says so in status, nothing is deleted, and once site-b's
    port is free again the application is placed there."""
    owned = pg.base / "site-a-foreign"
    owned.mkdir(mode=0o700)
    (owned / "PG_VERSION").write_text("15\n")
    (owned / "precious").write_text("do not delete\n")
    os.chown(owned, 0, 0)
    squatter = pg.stage.sites.spawn(
        "site-b",
        [
            sys.executable,
            "-c",
            "import socket, time\ns = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 5432)); s.listen(1); time.sleep(600)",
        ],
    )
    app = pg_application(pg.base, pg.stage)
    app["spec"]["score"]["sites"]["site-a"]["data_dir"] = str(owned)
    app["spec"]["score"]["sites"]["site-c"]["bin_dir"] = "/nonexistent/bin"
    await pg.stage.put(app)

    errors = {"site-a": "data-dir-owned", "site-b": "port-in-use", "site-c": "missing-binaries"}

    async def said() -> bool:
        reports = await pg.reports()
        return all(site in reports and errors[site] in json.dumps(reports[site]) for site in errors)

    await eventually(said, timeout=90, interval=0.5, what="each site's error in its report")
    reports = await pg.reports()
    assert all(r["state"] in ("failed", "stopped") for r in reports.values()), reports
    assert sorted(p.name for p in owned.iterdir()) == ["PG_VERSION", "precious"]
    assert squatter.poll() is None, "the squatter was left alone"

    squatter.kill()
    squatter.wait()
    site, _ = await pg.primary(timeout=120)
    assert site == "site-b"
    reports = await pg.reports()
    for site in ("site-a", "site-c"):  # still failing, and still saying why
        assert errors[site] in reports[site].get("error", ""), reports[site]
    assert (owned / "precious").read_text() == "do not delete\n"
