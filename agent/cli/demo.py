"""``harmony-agent demo``: three local sites, two applications, a live failover.

Everything is real: three agents, each running its site's nats-server (embedded, clustered
by routes on loopback), the operator CLI run as subprocesses, a workload that really stops
on one site and starts on another. Nothing is left behind: agents, servers and the
temporary state directory go away when the demo ends, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from agent.cli.demo_postgres import postgres_failover

SITES = ("site-a", "site-b", "site-c")
TTL = "2s"

APPS = """\
apiVersion: harmony/v1
kind: Application
metadata: {name: ledger}
spec:
  trait: stateful
  failover: {strategy: AbsoluteConsistency}
  placement: {sites: [site-a, site-b, site-c]}
  score:
    kind: Process
    command: [python3, -c, "import time\\nwhile True: time.sleep(1)"]
    stop_timeout: 2s
---
apiVersion: harmony/v1
kind: Application
metadata: {name: inference}
spec:
  trait: stateless
  failover: {strategy: SplitBrainAllowed, reconcile: keep-newest}
  placement: {sites: [site-a, site-b, site-c]}
  score:
    kind: Process
    command: [python3, -c, "import time\\nwhile True: time.sleep(1)"]
    stop_timeout: 2s
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DemoSite:
    name: str
    client: int
    route: int
    monitor: int
    health: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"


def _say(text: str) -> None:
    click.secho(f"\n==> {text}", bold=True, fg="cyan")


def _cli(args: list[str], server: str, *, show: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent.cli", *args]
    if show:
        click.secho("$ harmony-agent " + " ".join(args), fg="yellow")
    env = {**os.environ, "HARMONY_NATS_URL": server}
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60, env=env)
    if show:
        click.echo((result.stdout + result.stderr).rstrip())
    return result


def _status(server: str) -> dict[str, Any] | None:
    result = _cli(["status", "-o", "json"], server, show=False)
    if result.returncode != 0:
        return None
    try:
        doc: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        return None
    return doc


def _wait(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise click.ClickException(f"timed out after {timeout:.0f}s waiting for {what}")


def _ready(site: DemoSite) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{site.health}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _holder(server: str, app: str, running_only: bool = True) -> tuple[str, int] | None:
    doc = _status(server)
    for entry in (doc or {}).get("applications", []):
        if entry["name"] != app or not entry.get("holder"):
            continue
        states = {i["agent"]: i["state"] for i in entry.get("instances", [])}
        if not running_only or states.get(entry["holder"]) == "running":
            return str(entry["holder"]), int(entry.get("fencing_token") or 0)
    return None


def _start(workdir: Path) -> list[DemoSite]:
    sites = [DemoSite(n, _port(), _port(), _port(), _port()) for n in SITES]
    for site in sites:
        cfg = {
            "site": site.name,
            "node": "node-1",
            "state_dir": str(workdir / site.name),
            "nats": {
                "embedded": True,
                "servers": [site.url] + [o.url for o in sites if o is not site],
                "listen": f"127.0.0.1:{site.client}",
                "monitor_listen": f"127.0.0.1:{site.monitor}",
                "cluster_listen": f"127.0.0.1:{site.route}",
                "routes": [f"nats-route://127.0.0.1:{o.route}" for o in sites if o is not site],
            },
            "mesh": {"replicas": 3, "stores": list(SITES)},  # one lease store per site
            "lease": {"ttl": TTL},
            "health": {"listen": f"127.0.0.1:{site.health}"},
            "log": {"format": "json"},
        }
        path = workdir / f"{site.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = open(workdir / f"{site.name}.log", "ab")  # noqa: SIM115 - the child owns it
        site.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(path)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        click.echo(f"    {site.name}: agent pid {site.proc.pid}, nats {site.url}")
    return sites


def _stop(sites: list[DemoSite]) -> None:
    for site in sites:
        if site.proc and site.proc.poll() is None:
            site.proc.send_signal(signal.SIGTERM)
    for site in sites:
        if site.proc:
            try:
                site.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(site.proc.pid, signal.SIGKILL)


@click.command()
@click.option("--keep", is_flag=True, help="Keep the demo's state directory and logs.")
def demo(keep: bool) -> None:
    """Three local sites, a stateful and a stateless application, a live failover."""
    workdir = Path(tempfile.mkdtemp(prefix="harmony-demo-"))
    sites: list[DemoSite] = []
    try:
        _say(f"Starting three sites, each an agent with its own nats-server (ttl {TTL})")
        sites = _start(workdir)
        server = ",".join(s.url for s in sites)
        _wait("all agents ready", lambda: all(_ready(s) for s in sites), 60)
        click.echo("    all three agents are ready (connected, buckets ready, in quorum)")

        click.echo(f"    export HARMONY_NATS_URL={server}   # what the CLI calls below use")
        _say("Storing two applications in the mesh")
        apps = workdir / "apps.yaml"
        apps.write_text(APPS)
        _cli(["apply", "-f", str(apps)], server)
        first = _wait("ledger to run", lambda: _holder(server, "ledger"), 60)
        _wait("inference on every site", lambda: _all_running(server, "inference"), 60)
        _cli(["status"], server)

        holder, token = first
        victim = next(s for s in sites if s.name == holder.split("/")[0])
        _say(f"Killing {holder} (kill -9: agent, its nats-server, its workloads)")
        assert victim.proc is not None
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        killed = time.monotonic()
        rest = [s for s in sites if s is not victim]
        server = ",".join(s.url for s in rest)
        new = _wait(
            "ledger to fail over",
            lambda: h if (h := _holder(server, "ledger")) and h[0] != holder else None,
            60,
        )
        click.secho(
            f"    ledger failed over {holder} (token {token}) -> {new[0]} (token {new[1]}) "
            f"in {time.monotonic() - killed:.1f}s; never two copies (AbsoluteConsistency)",
            fg="green",
        )
        click.echo(
            "    (ttl plus, when the dead site's nats-server led the KV stream, JetStream's\n"
            "    4-9 s leader re-election: see docs/failover.md)"
        )
        _cli(["status"], server)

        target = next(s.name for s in rest if not new[0].startswith(s.name))
        _say(f"Planned handover of ledger to {target} (no waiting for expiry)")
        _cli(["cmd", "failover", "ledger", "--to", target], server)
        final = _wait(
            "handover",
            lambda: h if (h := _holder(server, "ledger")) and h[0].startswith(target) else None,
            30,
        )
        click.secho(f"    ledger now runs on {final[0]} (token {final[1]})", fg="green")
        postgres_failover(sites, workdir)  # the PostgreSQL act (demo_postgres.py)
        _say("Done. Stopping agents (each stops its workloads and releases its leases)")
    finally:
        _stop(sites)
        if keep:
            click.echo(f"state and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _all_running(server: str, app: str) -> bool:
    doc = _status(server)
    for entry in (doc or {}).get("applications", []):
        if entry["name"] == app:
            running = {
                i["agent"].split("/")[0]
                for i in entry.get("instances", [])
                if i["state"] == "running"
            }
            return running >= set(SITES)
    return False
