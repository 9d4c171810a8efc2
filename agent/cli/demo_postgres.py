"""The PostgreSQL part of ``harmony-agent demo``: a replicated database survives its
primary's site.

Three PostgreSQL instances on this machine, one per demo site (ports side by side), a
synchronous primary where the lease is and a streaming replica on each other site. A client
writes through the libpq multi-host string; the primary's whole agent is killed (kill -9),
its postgres is fenced by its watchdog at the lease deadline, the most up-to-date replica is
promoted, the client carries on, and the restarted site rejoins as a replica (pg_rewind).
Skipped, with the reason, where PostgreSQL is not installed.
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

APP = "ledger-db"


def _bin_dir() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return str(Path(found).resolve().parent)
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((d for d in dirs if os.access(f"{d}/pg_ctl", os.X_OK)), None)


def _os_user() -> str | None:
    if os.geteuid() != 0:
        return getpass.getuser()
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres"


def _application(base: Path, ports: dict[str, int], user: str, password: Path) -> str:
    sites = {
        name: {"port": port, "run_dir": str(base / name), "advertise": "127.0.0.1"}
        for name, port in ports.items()
    }
    doc = {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": APP},
        "spec": {
            "trait": "stateful",
            "failover": {"strategy": "AbsoluteConsistency"},
            "placement": {"sites": list(ports)},
            "score": {
                "kind": "PostgreSQL",
                "listen": "127.0.0.1",
                "synchronous": True,
                "os_user": user,
                "replication_password_file": str(password),
                "hba": ["host all all 127.0.0.1/32 trust"],
                "sites": sites,
                "stop_timeout": "5s",
                "parameters": {"shared_buffers": "16MB", "max_connections": 30},
            },
        },
    }
    return json.dumps(doc)


def _psql(bin_dir: str, dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [f"{bin_dir}/psql", "-X", "-q", "-A", "-t", "-d", dsn, "-c", sql],
        capture_output=True,
        text=True,
        check=False,
        timeout=15,
    )


def _roles(status: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """agent -> instance (with role, state, timeline) of the demo database."""
    for entry in (status or {}).get("applications", []):
        if entry["name"] == APP:
            return {i["agent"]: i for i in entry.get("instances", [])}
    return {}


def _primary(status: dict[str, Any] | None) -> str | None:
    found = [
        a
        for a, i in _roles(status).items()
        if i.get("role") == "primary" and i["state"] == "running" and not i.get("stale")
    ]
    return found[0] if len(found) == 1 else None


def postgres_failover(sites: list[Any], workdir: Path) -> None:
    """The demo's PostgreSQL act: a site killed earlier in the demo is started again first,
    so the database has all three sites."""
    from agent.cli.demo import _cli, _ready, _say, _wait

    server = ",".join(s.url for s in sites)
    bin_dir, user = _bin_dir(), _os_user()
    if bin_dir is None or user is None:
        why = "no PostgreSQL binaries" if bin_dir is None else "no postgres OS user"
        click.secho(f"\n(skipping the PostgreSQL failover: {why}; apt-get install postgresql-15)")
        return
    down = [s for s in sites if s.proc is None or s.proc.poll() is not None]
    if down:
        _say(f"Starting {', '.join(s.name for s in down)} again for the next act")
        for site in down:
            _restart(site, workdir)
            _wait(f"{site.name} ready", lambda site=site: _ready(site), 60)
    base = Path(tempfile.mkdtemp(prefix="harmony-demo-pg-", dir="/tmp"))
    base.chmod(0o755)  # the database's OS user walks into it
    try:
        _act(sites, server, workdir, base, bin_dir, user)
    finally:
        _cli(["delete", APP], server, show=False)
        time.sleep(2)  # the agents stop their instances (stop_timeout 5 s at most)
        for name in sorted(os.listdir(base)):
            data = base / name / "pgdata"
            if (data / "postmaster.pid").exists():  # whatever is left (demo only)
                subprocess.run(
                    [f"{bin_dir}/pg_ctl", "stop", "-D", str(data), "-m", "immediate"],
                    capture_output=True,
                    check=False,
                    user=user if os.geteuid() == 0 else None,
                )
        shutil.rmtree(base, ignore_errors=True)


def _restart(site: Any, workdir: Path) -> None:
    """Start a killed demo agent again, with its configuration and log."""
    log = open(workdir / f"{site.name}.log", "ab")  # noqa: SIM115 - the child owns it
    site.proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(workdir / f"{site.name}.yaml")],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()


def _act(sites: list[Any], server: str, workdir: Path, base: Path, bin_dir: str, user: str) -> None:
    from agent.cli.demo import _cli, _port, _ready, _say, _status, _wait

    ports = {s.name: _port() for s in sites}
    password = base / "replication.password"
    password.write_text("demo-only-replication-secret\n")
    password.chmod(0o600)
    doc = workdir / "ledger-db.json"
    doc.write_text(_application(base, ports, user, password))
    _say("A replicated PostgreSQL: the primary where the lease is, a replica on every other site")
    _cli(["apply", "-f", str(doc)], server)
    primary = _wait("a PostgreSQL primary", lambda: _primary(_status(server)), 120)

    def streaming() -> bool:
        roles = _roles(_status(server))
        replicas = [i for i in roles.values() if i.get("role") == "replica"]
        return len(replicas) == len(sites) - 1 and all(i["state"] == "standby" for i in replicas)

    _wait("two streaming replicas", streaming, 120)
    hosts = ",".join("127.0.0.1" for _ in ports)
    dsn = (
        f"host={hosts} port={','.join(str(p) for p in ports.values())} dbname=postgres "
        f"user={user} target_session_attrs=read-write connect_timeout=2"
    )
    click.echo(f"    clients use the multi-host string:\n      {dsn}")
    _psql(bin_dir, dsn, "CREATE TABLE IF NOT EXISTS demo (id int PRIMARY KEY, port int)")
    written = 0

    def write() -> int | None:
        """The next id through the multi-host string; the port that acknowledged it."""
        nonlocal written
        sql = f"INSERT INTO demo VALUES ({written + 1}, inet_server_port()) RETURNING port"
        res = _psql(bin_dir, dsn, sql)
        if res.returncode != 0 or not res.stdout.strip().isdigit():
            return None
        written += 1
        return int(res.stdout.strip())

    for _ in range(20):
        write()
    click.echo(f"    wrote ids 1..{written}, each acknowledged by a synchronous replica")
    _cli(["status"], server)

    victim = next(s for s in sites if s.name == primary.split("/")[0])
    old_port = ports[victim.name]
    _say(f"Killing {primary} (kill -9: its agent; its postgres is fenced by the watchdog)")
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    killed = time.monotonic()
    last_old, failed = killed, 0
    while True:  # the client keeps writing through the multi-host string
        port = write()
        if port == old_port:
            last_old = time.monotonic()  # the old primary, until its lease deadline
        elif port is not None:
            break
        else:
            failed += 1
        if time.monotonic() - killed > 90:
            raise click.ClickException("no new primary accepted a write within 90 s")
        time.sleep(0.05)
    gap = time.monotonic() - last_old
    rest = ",".join(s.url for s in sites if s is not victim)
    new = _wait("the new primary", lambda: _primary(_status(rest)), 30)
    found = _psql(bin_dir, dsn, f"SELECT count(*) FROM demo WHERE id <= {written}").stdout.strip()
    click.secho(
        f"    {new} was promoted; no write was acknowledged for {gap:.1f}s ({failed} attempts "
        f"failed), then the client carried on there; {found} of {written} ids present",
        fg="green",
    )
    _say(f"Restarting {victim.name}: its old primary rejoins as a replica (pg_rewind)")
    _restart(victim, workdir)
    _wait(f"{victim.name} ready", lambda: _ready(victim), 60)

    def rejoined() -> bool:
        roles = _roles(_status(server))
        me, top = roles.get(primary, {}), roles.get(new, {})
        return (
            me.get("role") == "replica"
            and me.get("state") == "standby"
            and me.get("timeline") == top.get("timeline")
        )

    _wait(f"{primary} to rejoin", rejoined, 120)
    _cli(["status"], server)
