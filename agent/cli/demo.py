"""``harmony-agent demo``: three local sites, two applications, a live failover, an eviction.

Everything is real: three agents, each running its site's nats-server (embedded, clustered
by routes on loopback, mTLS on every link, one identity per agent and per person), the
operator CLI run as subprocesses with its own certificate, a workload that really stops on
one site and starts on another, and ``trust revoke`` cutting a live site out of the mesh.
Nothing is left behind: agents, servers and the temporary state directory go away when
the demo ends, also on Ctrl-C.
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
ADMIN, OPERATOR, TRUST_ADMIN = "demo-admin", "demo-ops", "demo-trust"

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
    system: int
    proc: subprocess.Popen[bytes] | None = None
    config: Path | None = None

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.client}"

    def peers(self) -> set[str]:
        """Server names this site's nats-server has routes to (its ``/routez``)."""
        import urllib.request

        try:
            url = f"http://127.0.0.1:{self.monitor}/routez"
            with urllib.request.urlopen(url, timeout=1) as r:
                return {str(x["remote_name"]) for x in json.loads(r.read())["routes"]}
        except (OSError, ValueError, KeyError):
            return set()


@dataclass
class Pki:
    """Every certificate of the demo, made with the same code as ``harmony-agent ca``."""

    root: Path
    admin_public_key: str = ""

    def leaf(self, ca: Any, name: str, **sans: list[str]) -> None:
        from mesh.trust import cert_pem, write_private

        cert, key = ca.issue(name, **sans)
        out = self.root / ca.site
        (out / f"{name}.crt").write_bytes(cert_pem(cert) + cert_pem(ca.cert))
        write_private(out / f"{name}.key", key)

    def make(self) -> None:
        from mesh.trust import SiteCA, cert_pem, create_admin_key

        people = SiteCA.create("operators", self.root / "operators")
        for person in (ADMIN, OPERATOR, TRUST_ADMIN):
            self.leaf(people, person)
        cas = []
        for site in SITES:
            ca = SiteCA.create(site, self.root / site)
            cas.append(cert_pem(ca.cert))
            self.leaf(ca, "nats", dns=["localhost"], ips=["127.0.0.1"])
            self.leaf(ca, "node-1")
            (self.root / site / "clients.pem").write_bytes(
                cert_pem(ca.cert) + cert_pem(people.cert)
            )
        (self.root / "cas.pem").write_bytes(b"".join(cas))
        self.admin_public_key = create_admin_key(self.root / "trust-admin")

    def env(self, person: str) -> dict[str, str]:
        """The CLI's connection as ``person`` (HARMONY_NATS_CA/CERT/KEY)."""
        return {
            "HARMONY_NATS_CA": str(self.root / "cas.pem"),
            "HARMONY_NATS_CERT": str(self.root / "operators" / f"{person}.crt"),
            "HARMONY_NATS_KEY": str(self.root / "operators" / f"{person}.key"),
        }


def _say(text: str) -> None:
    click.secho(f"\n==> {text}", bold=True, fg="cyan")


IDENTITY: dict[str, str] = {}
"""The CLI's default identity (the operator's certificate), set once the PKI exists."""


def _cli(
    args: list[str], server: str, *, show: bool = True, as_: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "agent.cli", *args]
    if show:
        click.secho("$ harmony-agent " + " ".join(args), fg="yellow")
    env = {**os.environ, **(as_ or IDENTITY), "HARMONY_NATS_URL": server}
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


def _config(site: DemoSite, sites: list[DemoSite], workdir: Path, pki: Pki) -> dict[str, Any]:
    tls = pki.root / site.name
    bundle = workdir / site.name / "trust" / "ca-bundle.pem"
    if not bundle.exists():  # the bootstrap trust: every site's public CA
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bundle.write_bytes((pki.root / "cas.pem").read_bytes())
    return {
        "site": site.name,
        "node": "node-1",
        "state_dir": str(workdir / site.name),
        "nats": {
            "embedded": True,
            "servers": [site.url],
            "listen": f"127.0.0.1:{site.client}",
            "monitor_listen": f"127.0.0.1:{site.monitor}",
            "system_listen": f"127.0.0.1:{site.system}",
            "cluster_listen": f"127.0.0.1:{site.route}",
            "routes": [f"nats-route://localhost:{o.route}" for o in sites if o is not site],
            "tls": {
                "ca_file": str(tls / "ca.crt"),
                "cert_file": str(tls / "node-1.crt"),
                "key_file": str(tls / "node-1.key"),
            },
            "server_tls": {
                "cert_file": str(tls / "nats.crt"),
                "key_file": str(tls / "nats.key"),
                "client_ca_file": str(tls / "clients.pem"),
                "route_ca_file": str(bundle),
            },
            "accounts": {
                "stores": list(SITES),
                "operators": [OPERATOR],
                "trust_admins": [TRUST_ADMIN],
                "admins": [ADMIN],
            },
        },
        "mesh": {"replicas": 3, "stores": list(SITES)},  # one lease store per site
        "lease": {"ttl": TTL},
        "health": {"listen": f"127.0.0.1:{site.health}"},
        "log": {"format": "json"},
        "trust": {
            "bundle_file": str(bundle),
            "admin_public_key": pki.admin_public_key,
            "site_ca_file": str(tls / "ca.crt"),
        },
    }


def _launch(site: DemoSite, workdir: Path) -> None:
    assert site.config is not None
    log = open(workdir / f"{site.name}.log", "ab")  # noqa: SIM115 - the child owns it
    site.proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(site.config)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()


def _start(workdir: Path, pki: Pki) -> list[DemoSite]:
    sites = [DemoSite(n, _port(), _port(), _port(), _port(), _port()) for n in SITES]
    for site in sites:
        site.config = workdir / f"{site.name}.yaml"
        site.config.write_text(yaml.safe_dump(_config(site, sites, workdir, pki)))
        _launch(site, workdir)
        assert site.proc is not None
        click.echo(f"    {site.name}: agent pid {site.proc.pid}, nats {site.url} (mTLS)")
    return sites


def _init_mesh(server: str, pki: Pki) -> None:
    """The admin creates the mesh, the trust-admin signs the three CAs into it (retried
    while the servers are still forming their cluster)."""
    admin, trust = pki.env(ADMIN), pki.env(TRUST_ADMIN)
    stores = ",".join(SITES)
    init = ["mesh", "init", "--stores", stores, "--replicas", "3", "--timeout", "10s"]
    _wait("the mesh to form", lambda: _cli(init, server, as_=admin, show=False).returncode == 0, 60)
    click.secho("$ harmony-agent " + " ".join(init), fg="yellow")
    key = str(pki.root / "trust-admin" / "trust-admin.key")
    for site in SITES:
        add = ["trust", "add", str(pki.root / site / "ca.crt"), "--admin-key", key]
        _wait(
            f"{site}'s CA in the mesh",
            lambda a=add: _cli(a, server, as_=trust, show=False).returncode == 0,
            30,
        )
        click.secho("$ harmony-agent " + " ".join(add), fg="yellow")


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
        _say("Certificates: a CA per site, one identity per agent and per person")
        pki = Pki(workdir / "pki")
        pki.make()
        IDENTITY.update(pki.env(OPERATOR))
        # Readers verify the signed trust entries with the trust-admin's public key.
        IDENTITY["HARMONY_TRUST_ADMIN_PUBLIC_KEY"] = pki.admin_public_key
        click.echo(
            "    site CAs for site-a, site-b, site-c; leaves for each nats-server and agent;\n"
            f"    people {ADMIN} (admin), {OPERATOR} (operator), {TRUST_ADMIN} (trust-admin);\n"
            "    an offline trust-admin signing key (harmony-agent ca init/issue, "
            "ca trust-admin-init)"
        )
        _say(f"Starting three sites, each an agent with its own nats-server (ttl {TTL})")
        sites = _start(workdir, pki)
        server = ",".join(s.url for s in sites)
        _say("The admin creates the mesh; the trust-admin signs each site's CA into it")
        _init_mesh(server, pki)
        _wait("all agents ready", lambda: all(_ready(s) for s in sites), 60)
        click.echo("    all three agents are ready (connected, buckets ready, in quorum)")

        click.echo(
            f"    export HARMONY_NATS_URL={server}\n"
            f"    export HARMONY_NATS_CA=... HARMONY_NATS_CERT={OPERATOR}.crt "
            f"HARMONY_NATS_KEY=...   # the CLI calls below: {OPERATOR}"
        )
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
            "    (as `status` saw it: the lease moves about a ttl after the kill, in the lease\n"
            "    stores of the live sites; the new instance's report lands in the replicated\n"
            "    state bucket, which waits for JetStream to re-elect its leader when the killed\n"
            "    server led it. LEASE AGE below is the lease's own age: docs/failover.md)"
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
        _evict(victim, sites, workdir, pki, _holder(server, "ledger") or final)
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


def _evict(
    victim: DemoSite, sites: list[DemoSite], workdir: Path, pki: Pki, holder: tuple[str, int]
) -> None:
    """Bring the killed site back, then evict it live with ``trust revoke``."""
    server = ",".join(s.url for s in sites)
    others = [s for s in sites if s is not victim]
    _say(f"{victim.name} comes back; then the trust-admin evicts it (say it was compromised)")
    if victim.proc is None or victim.proc.poll() is not None:  # not already restarted
        _launch(victim, workdir)
    _wait(f"{victim.name} back in the mesh", lambda: _ready(victim), 60)
    for s in others:
        click.echo(f"    {s.name}'s nats-server routes to: {', '.join(sorted(s.peers()))}")
    key = str(pki.root / "trust-admin" / "trust-admin.key")
    _cli(["trust", "revoke", victim.name, "--admin-key", key], server, as_=pki.env(TRUST_ADMIN))
    revoked = time.monotonic()
    gone = f"{victim.name}-node-1"
    _wait(
        f"{victim.name}'s routes closed",
        lambda: all(s.peers() and gone not in s.peers() for s in others),
        30,
    )
    took = time.monotonic() - revoked
    for s in others:
        click.echo(f"    {s.name}'s nats-server routes to: {', '.join(sorted(s.peers()))}")
    click.secho(
        f"    {victim.name} evicted {took:.1f}s after `trust revoke` returned: every remaining "
        "server reloaded a bundle\n    without its CA and closed its routes; it cannot "
        "reconnect, and only a newer signed entry\n    (trust add) would let it back. ledger "
        "stays on "
        f"{holder[0]} (token {holder[1]})",
        fg="green",
    )
    remaining = ",".join(s.url for s in others)
    # The trust bucket may be re-electing a leader (one of its replicas was on the evicted
    # site): ask again until it answers.
    listed = _wait(
        "the trust list",
        lambda: (
            r if (r := _cli(["trust", "list"], remaining, show=False)).returncode == 0 else None
        ),
        30,
    )
    click.secho("$ harmony-agent trust list", fg="yellow")
    click.echo(listed.stdout.rstrip())
