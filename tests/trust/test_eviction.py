"""Eviction that disconnects (issue 12 item 2), in network namespaces with real agents.

Three sites each run ``harmony-agent run``: an embedded mTLS nats-server with per-identity
accounts, signed trust sync, eviction, leases and a Process workload. site-c also has an
agent identity without a server of its own (``site-c/n2``, a bare client here) connected
to site-a. ``harmony-agent trust revoke site-c`` by the trust-admin must, within 2 x ttl:
drop every route to and from site-c (``/routez`` on all three), drop site-c/n2's client
connection at site-a (``/connz``); reconnects then fail; the site-a <-> site-b routes are
the very same connections as before; site-c's application then runs on another site, and
site-a's keeps its holder and fencing token (no lease of site-a or site-b is lost).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from click.testing import CliRunner, Result
from nats.aio.client import Client

from agent.cli import cli
from mesh.authz import agent_inbox_prefix, user_inbox_prefix
from tests.harness.nats import NatsNode
from tests.harness.secure import SecureSites, ca_cli, client_context, server_host
from tests.harness.wait import eventually

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

TTL = 5.0
MEMBERS = ("site-a", "site-b", "site-c")
REPO = Path(__file__).resolve().parents[2]


class Mesh:
    def __init__(self, sites: SecureSites, admin_public: str) -> None:
        self.sites = sites
        self.admin_public = admin_public
        self.monitors = {
            name: NatsNode(
                name=f"n-{name}",
                workdir=sites.workdir / name / "mon",
                host=sites.sites[name].mgmt_ip,
                monitor_port=8222,
                port=4222,
            )
            for name in MEMBERS
        }

    async def status(self, site: str) -> dict[str, Any]:
        """The agent's live status, asked through its own site's server as an operator."""
        nc = await nats.connect(
            servers=[self.url(site)],
            tls=self.sites.person_context(site, "ops-1"),
            inbox_prefix=user_inbox_prefix("ops-1"),
            allow_reconnect=False,
            connect_timeout=3,
        )
        try:
            reply = await nc.request(f"harmony.status.{site}.n1", b"{}", timeout=3)
        finally:
            await nc.close()
        data: dict[str, Any] = json.loads(reply.data)
        return data

    def routes(self, site: str) -> list[dict[str, Any]]:
        return self.monitors[site].varz("routez")["routes"]  # type: ignore[return-value]

    def peers(self, site: str) -> set[str]:
        return {r["remote_name"] for r in self.routes(site)}

    def users(self, site: str) -> set[str]:
        conns = self.monitors[site].varz("connz?auth=true")["connections"]
        return {c.get("authorized_user", "") for c in conns}  # type: ignore[union-attr]

    def url(self, site: str) -> str:
        return f"tls://{self.sites.sites[site].mgmt_ip}:4222"

    def as_person(self, site: str, user: str) -> dict[str, str]:
        cert, key = self.sites.leaf("operators", user)
        return {
            "HARMONY_NATS_CA": str(self.sites.pki.ca_cert(site)),
            "HARMONY_NATS_CERT": str(cert),
            "HARMONY_NATS_KEY": str(key),
        }

    async def cli(self, *args: str, env: dict[str, str]) -> Result:
        return await asyncio.to_thread(
            CliRunner().invoke, cli, list(args), env=env, catch_exceptions=False
        )

    async def retried(self, *args: str, env: dict[str, str]) -> None:
        """``harmony-agent <args>``, retried while JetStream is electing a leader for a
        bucket (just created, or its leader was on an evicted site): the CLI then fails
        with a timeout or "unavailable", as an operator would see, and is run again."""

        async def attempt() -> bool:
            result = await self.cli(*args, "-s", self.url("site-a"), env=env)
            transient = any(
                t in result.output
                for t in ("TimeoutError", "ServiceUnavailable", "no answer", "unavailable")
            )
            assert result.exit_code == 0 or transient, result.output
            return result.exit_code == 0

        await eventually(attempt, timeout=30, interval=0.5, what=" ".join(args[:2]))

    async def trust(self, *args: str, env: dict[str, str]) -> None:
        await self.retried("trust", *args, env=env)


def application(name: str, first: str) -> dict[str, Any]:
    sites = [first, *(s for s in MEMBERS if s != first)]
    return {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": name},
        "spec": {
            "trait": "stateful",
            "placement": {"sites": sites},
            "score": {
                "kind": "Process",
                "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
                "stop_timeout": "1s",
            },
        },
    }


def site_config(sites: SecureSites, name: str, admin_public: str) -> Path:
    site_dir = sites.workdir / name
    cert, key = sites.leaf(name, "n1")
    server_cert, server_key = sites.leaf(name, "nats")
    bundle = sites.route_ca(name)
    accounts: dict[str, Any] = {
        "stores": list(MEMBERS),
        "admins": ["adm-1"],
        "trust_admins": ["ta-1"],
        "operators": ["ops-1"],
        "viewers": ["view-1"],
    }
    if name == "site-a":
        accounts["agents"] = ["site-c/n2"]  # site-c's serverless agent connects here
    config = {
        "site": name,
        "node": "n1",
        "state_dir": str(site_dir / "state"),
        "lease": {"ttl": f"{TTL}s"},
        "log": {"format": "json"},
        "nats": {
            "embedded": True,
            # Only so that the test reaches the monitoring port over the management link;
            # client and route listeners have mTLS regardless.
            "insecure": True,
            "servers": ["tls://127.0.0.1:4222"],
            "listen": "0.0.0.0:4222",
            "monitor_listen": "0.0.0.0:8222",
            "cluster_listen": "0.0.0.0:6222",
            "routes": [f"nats-route://{server_host(o)}:6222" for o in MEMBERS if o != name],
            "tls": {
                "ca_file": str(sites.pki.ca_cert(name)),
                "cert_file": str(cert),
                "key_file": str(key),
            },
            "server_tls": {
                "cert_file": str(server_cert),
                "key_file": str(server_key),
                "client_ca_file": str(sites.pki.root / f"clients-{name}.pem"),
                "route_ca_file": str(bundle),
            },
            "accounts": accounts,
        },
        "trust": {
            "bundle_file": str(bundle),
            "admin_public_key": admin_public,
            "site_ca_file": str(sites.pki.ca_cert(name)),
        },
    }
    path = site_dir / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
async def mesh(tmp_path: Path, require_netns: None) -> AsyncIterator[Mesh]:
    sites = SecureSites(tmp_path / "sites")
    try:
        sites.setup()
        sites.make_pki()
        sites.pki.issue("site-c", "n2")
        out = ca_cli("ca", "trust-admin-init", "--out", str(sites.pki.root / "admin"))
        admin_public = out.split("public key ", 1)[1].split()[0]
        m = Mesh(sites, admin_public)
        for name in MEMBERS:
            config = site_config(sites, name, admin_public)
            sites.spawn(
                name,
                [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
                log=sites.workdir / name / "agent.log",
                env={"PYTHONPATH": str(REPO)},
            )
        for name in MEMBERS:
            await eventually(
                lambda n=name: m.monitors[n].healthy(),  # type: ignore[misc]
                timeout=40,
                what=f"{name}'s embedded server healthy",
            )
        await eventually(
            lambda: all(m.peers(s) == {f"{o}-n1" for o in MEMBERS if o != s} for s in MEMBERS),
            timeout=30,
            what="the mTLS mesh",
        )
        # The admin creates the mesh; the agents were waiting for it.
        adm = m.as_person("site-a", "adm-1")
        await m.retried("mesh", "init", "--stores", ",".join(MEMBERS), "--replicas", "3", env=adm)
        yield m
    finally:
        for name in MEMBERS:
            log = sites.workdir / name / "agent.log"
            if log.exists():
                print(f"--- {name} agent log (tail)\n{log.read_text()[-3000:]}")
        sites.teardown()


async def test_revoked_site_is_disconnected_and_stays_out(mesh: Mesh) -> None:
    sites = mesh.sites
    admin_key = str(sites.pki.root / "admin" / "trust-admin.key")
    ta = mesh.as_person("site-a", "ta-1")

    # The trust-admin signs every site's CA into harmony-trust.
    for name in MEMBERS:
        await mesh.trust("add", str(sites.pki.ca_cert(name)), "--admin-key", admin_key, env=ta)

    async def signed(site: str) -> bool:
        trust = (await mesh.status(site))["security"]["trust"]
        return (
            bool(trust["synced"])
            and trust["bootstrap_only"] == []
            and set(trust["sites"]) == set(MEMBERS)
        )

    for name in MEMBERS:
        await eventually(
            lambda n=name: signed(n),  # type: ignore[misc]
            timeout=30,
            what=f"{name} synced the signed bundle",
        )

    # One application preferring site-c, one preferring site-a.
    ops = mesh.as_person("site-a", "ops-1")
    apps = sites.workdir / "apps.yaml"
    apps.write_text(
        yaml.safe_dump_all([application("on-c", "site-c"), application("on-a", "site-a")])
    )
    await mesh.retried("apply", "-f", str(apps), env=ops)

    async def running_on(site: str) -> dict[str, int | None]:
        """What ``site``'s agent runs, by application, with its lease token (live status)."""
        try:
            instances = (await mesh.status(site))["instances"]
        except (OSError, TimeoutError, nats.errors.Error):
            return {}
        return {i["app"]: i["lease_token"] for i in instances if i["state"] == "running"}

    async def placed() -> bool:
        return "on-c" in await running_on("site-c") and "on-a" in await running_on("site-a")

    await eventually(placed, timeout=60, interval=0.5, what="on-c on site-c, on-a on site-a")
    kept_token = (await running_on("site-a"))["on-a"]
    assert kept_token is not None

    # site-c's serverless agent, connected to site-a (site-a trusts site-c's CA for it only
    # while the signed bundle does), reconnecting for ever like an agent does.
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(repr(exc))

    guest_ctx = client_context(sites.pki.ca_cert("site-a"), *sites.leaf("site-c", "n2"))
    guest: Client | None = None

    async def connect_guest() -> bool:
        nonlocal guest
        guest = await nats.connect(
            servers=[mesh.url("site-a")],
            tls=guest_ctx,
            inbox_prefix=agent_inbox_prefix("site-c", "n2"),
            error_cb=on_error,
            reconnect_time_wait=0.2,
            max_reconnect_attempts=-1,
            connect_timeout=2,
        )
        return True

    await eventually(connect_guest, timeout=20, what="site-c/n2 connected to site-a")
    assert guest is not None
    assert "CN=n2,OU=site-c,O=harmony" in mesh.users("site-a")

    def ab_routes() -> dict[str, set[tuple[int, str]]]:
        return {
            "site-a": {
                (r["rid"], r["start"])
                for r in mesh.routes("site-a")
                if r["remote_name"] == "site-b-n1"
            },
            "site-b": {
                (r["rid"], r["start"])
                for r in mesh.routes("site-b")
                if r["remote_name"] == "site-a-n1"
            },
        }

    before_ab = ab_routes()
    assert all(before_ab.values()), (
        before_ab,
        [(r["remote_name"], r["rid"]) for r in mesh.routes("site-a")],
    )

    # Evict site-c.
    await mesh.trust("revoke", "site-c", "--admin-key", admin_key, env=ta)
    t0 = time.monotonic()

    def remaining() -> dict[str, object]:
        """What is left of site-c on the servers (empty when evicted)."""
        left: dict[str, object] = {
            "site-a routes": "site-c-n1" in mesh.peers("site-a"),
            "site-b routes": "site-c-n1" in mesh.peers("site-b"),
            "site-c routes": sorted(mesh.peers("site-c")),
            "site-a clients": "CN=n2,OU=site-c,O=harmony" in mesh.users("site-a"),
        }
        return {k: v for k, v in left.items() if v}

    def evicted() -> bool:
        return not remaining()

    try:
        await eventually(evicted, timeout=2 * TTL, what="site-c's routes and clients gone")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still there: {remaining()}") from None
    took = time.monotonic() - t0
    print(f"\nsite-c evicted {took:.2f}s after `trust revoke` returned (ttl {TTL:g}s)")

    # Reconnects fail: the guest keeps trying and is refused; site-c's server keeps dialling
    # and is refused (new TLS failures after the eviction, never a route).
    seen = len(errors)
    await eventually(lambda: len(errors) >= seen + 2, timeout=10, what="guest reconnects refused")
    assert guest.is_connected is False
    c_ip = sites.sites["site-c"].data_ip
    log_a = mesh.monitors["site-a"]
    logged_before = (sites.workdir / "site-a" / "state" / "nats" / "nats-server.log").read_text()
    await eventually(
        lambda: (
            (sites.workdir / "site-a" / "state" / "nats" / "nats-server.log")
            .read_text()[len(logged_before) :]
            .count(f"{c_ip}:")
            >= 1
        ),
        timeout=10,
        what="site-c's route attempts refused by site-a",
    )
    assert evicted(), "site-c came back"
    assert log_a is not None

    # site-a and site-b never lost each other: the very same route connections.
    assert ab_routes() == before_ab

    # What each site did and says.
    report_a = (await mesh.status("site-a"))["security"]["evictions"][-1]
    assert report_a["routes_removed"] == [f"nats-route://{server_host('site-c')}:6222"]
    assert report_a["clients_kicked"] == 1 and report_a["reloaded"] is True
    report_b = (await mesh.status("site-b"))["security"]["evictions"][-1]
    assert report_b["routes_removed"] == [f"nats-route://{server_host('site-c')}:6222"]
    trust_c = (await mesh.status("site-c"))["security"]["trust"]
    assert trust_c["own_site_revoked"] is True and "site-c" in trust_c["revoked"]
    assert sites.pki.ca_cert("site-c").read_bytes() in sites.route_ca("site-c").read_bytes()
    assert sites.pki.ca_cert("site-c").read_bytes() not in sites.route_ca("site-a").read_bytes()
    print(json.dumps({"site-a": report_a, "site-b": report_b}, indent=1))

    # site-c's application runs elsewhere; site-a's never lost its lease (same token).
    async def moved() -> str | None:
        for site in ("site-a", "site-b"):
            if "on-c" in await running_on(site):
                return site
        return None

    where = await eventually(moved, timeout=60, interval=0.5, what="on-c running elsewhere")
    print(f"on-c runs on {where} {time.monotonic() - t0:.1f}s after the revoke")
    assert (await running_on("site-a"))["on-a"] == kept_token

    # Only a newer signed entry brings site-c back: its routes are restored, its guest
    # agent gets in again.
    await mesh.trust("add", str(sites.pki.ca_cert("site-c")), "--admin-key", admin_key, env=ta)
    await eventually(
        lambda: (
            all(mesh.peers(s) == {f"{o}-n1" for o in MEMBERS if o != s} for s in MEMBERS)
            and "CN=n2,OU=site-c,O=harmony" in mesh.users("site-a")
        ),
        timeout=20,
        what="site-c back after a newer signed entry",
    )
    assert (await mesh.status("site-a"))["security"]["evictions"][-1]["routes_restored"] == [
        f"nats-route://{server_host('site-c')}:6222"
    ]
    await guest.close()
