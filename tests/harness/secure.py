"""A mesh secured as issue 11 asks: sites in network namespaces, mTLS on every link.

Certificates come from the project's own ``harmony-agent ca`` commands (run in-process with
click's runner, the same code as the CLI). Every site gets:

- its CA (``ca init --site <site>``), a server leaf whose DNS SAN ``nats.<site>.harmony.test``
  is the host other sites' route URLs name (``verify_cert_and_check_known_urls``), and an
  agent leaf per node (``CN=<node>,OU=<site>``, mapped to that agent's user);
- a nats-server whose client listener trusts the site CA plus the operators' CA, whose
  routes trust the federated bundle, whose users are rendered by ``mesh.authz`` for this
  site only, and whose system-account user listens on loopback inside the namespace.

Route host names resolve through ``/etc/netns/<ns>/hosts`` (``ip netns exec`` bind-mounts
it over ``/etc/hosts``), created here and removed at teardown.
"""

from __future__ import annotations

import dataclasses
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

import nats
from click.testing import CliRunner
from nats.aio.client import Client

from agent.cli import cli
from mesh.authz import MeshNames, Roles, agent_inbox_prefix, render_accounts, user_inbox_prefix
from mesh.embedded import ServerSpec, ServerTls
from tests.harness.nats import NatsNode
from tests.harness.netns import Sites

DOMAIN = "harmony.test"
SYSTEM_PORT = 4223
SYSTEM_PASSWORD = "sys-secret-for-tests"
PEOPLE = {"operators": ("ops-1",), "viewers": ("view-1",), "trust_admins": ("ta-1",)}
ADMIN = "adm-1"


def server_host(site: str) -> str:
    return f"nats.{site}.{DOMAIN}"


def ca_cli(*args: str) -> str:
    """Run ``harmony-agent <args>`` in-process; fail loudly with its output."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"harmony-agent {' '.join(args)}: {result.output}"
    return result.output


@dataclass
class Pki:
    """CAs and leaves under ``root``, made with ``harmony-agent ca``."""

    root: Path

    def ca_dir(self, site: str) -> Path:
        return self.root / "ca" / site

    def ca_cert(self, site: str) -> Path:
        return self.ca_dir(site) / "ca.crt"

    def init(self, site: str) -> Path:
        ca_cli("ca", "init", "--site", site, "--dir", str(self.ca_dir(site)))
        return self.ca_cert(site)

    def issue(
        self,
        site: str,
        name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        days: int = 90,
    ) -> tuple[Path, Path]:
        out = self.root / "leaves" / site
        args = ["ca", "issue", name, "--dir", str(self.ca_dir(site)), "--out", str(out)]
        for d in dns:
            args += ["--dns", d]
        for i in ips:
            args += ["--ip", i]
        args += ["--days", str(days)]
        ca_cli(*args)
        return out / f"{name}.crt", out / f"{name}.key"

    def concat(self, name: str, *files: Path) -> Path:
        path = self.root / name
        path.write_bytes(b"".join(f.read_bytes() for f in files))
        return path


def client_context(ca_file: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass
class SecureNode(NatsNode):
    """A NatsNode whose config adds mTLS, the site's accounts and a loopback system user."""

    server_tls: ServerTls | None = None
    accounts: str = ""
    system_listen: str | None = None

    @property
    def url(self) -> str:
        return f"tls://{self.host}:{self.port}"

    @property
    def plain_url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def spec(self) -> ServerSpec:
        return dataclasses.replace(
            super().spec(),
            server_tls=self.server_tls,
            accounts=self.accounts,
            system_listen=self.system_listen,
        )


class SecureSites(Sites):
    """``Sites`` whose nats-servers speak only mTLS, with per-site identities."""

    def __init__(
        self,
        workdir: Path,
        names: tuple[str, ...] = ("site-a", "site-b", "site-c"),
        nodes: tuple[str, ...] = ("n1",),
        rogue: str | None = None,
    ) -> None:
        """``rogue``: one more namespace whose CA no site trusts (joins nothing)."""
        super().__init__(workdir, (*names, rogue) if rogue else names)
        self.members = names
        self.rogue = rogue
        self.nodes = nodes
        self.pki = Pki(workdir / "pki")
        self.stores = MeshNames(stores=names)
        self.bundle = self.pki.root / "bundle.pem"
        self.operators_ca = self.pki.ca_cert("operators")

    # --- namespaces --------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{s.data_ip} {server_host(s.name)}\n" for s in self.sites.values()
        )
        for site in self.sites.values():
            etc = Path("/etc/netns") / site.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            for site in self.sites.values():
                shutil.rmtree(Path("/etc/netns") / site.ns, ignore_errors=True)

    # --- certificates ------------------------------------------------------------------

    def make_pki(self) -> None:
        self.operators_ca = self.pki.init("operators")
        for site in self.sites.values():
            if site.name == self.rogue:
                # An unknown CA whose server claims a member's name: refused all the same.
                self.pki.init(site.name)
                self.pki.issue(
                    site.name,
                    "nats",
                    dns=(server_host(self.members[0]), server_host(site.name)),
                    ips=(site.data_ip, site.mgmt_ip, "127.0.0.1"),
                )
                self.pki.issue(site.name, "n1")
                continue
            self.pki.init(site.name)
            self.pki.issue(
                site.name,
                "nats",
                dns=(server_host(site.name),),
                ips=(site.data_ip, site.mgmt_ip, "127.0.0.1"),
            )
            for node in self.nodes:
                self.pki.issue(site.name, node)
            self.pki.concat(
                f"clients-{site.name}.pem", self.pki.ca_cert(site.name), self.operators_ca
            )
        people = [u for users in PEOPLE.values() for u in users] + [ADMIN]
        for user in people:
            self.pki.issue("operators", user)
        self.bundle = self.pki.concat("bundle.pem", *(self.pki.ca_cert(s) for s in self.members))

    def leaf(self, site: str, name: str) -> tuple[Path, Path]:
        out = self.pki.root / "leaves" / site
        return out / f"{name}.crt", out / f"{name}.key"

    def roles(self, site: str) -> Roles:
        return Roles(
            site=site,
            agents=self.nodes,
            operators=PEOPLE["operators"],
            viewers=PEOPLE["viewers"],
            trust_admins=PEOPLE["trust_admins"],
            admins=(ADMIN,),
            system_password=SYSTEM_PASSWORD,
        )

    # --- servers -----------------------------------------------------------------------

    def server_tls(self, site: str, route_ca: Path | None = None) -> ServerTls:
        cert, key = self.leaf(site, "nats")
        return ServerTls(
            cert_file=cert,
            key_file=key,
            client_ca_file=self.pki.root / f"clients-{site}.pem",
            route_ca_file=route_ca or self.route_ca(site),
        )

    def route_ca(self, site: str) -> Path:
        """Each server reads its own copy of the bundle, so one site can be reloaded alone."""
        path = self.workdir / site / "bundle.pem"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.bundle.read_bytes())
        return path

    def secure_node(self, site_name: str, peers: tuple[str, ...] | None = None) -> SecureNode:
        site = self.sites[site_name]
        others = peers if peers is not None else tuple(s for s in self.members if s != site_name)
        return SecureNode(
            name=f"n-{site.name}",
            workdir=self.workdir / site.name / "nats",
            host=site.mgmt_ip,
            bind="0.0.0.0",
            port=4222,
            monitor_port=8222,
            cluster_port=6222,
            routes=tuple(f"nats-route://{server_host(o)}:6222" for o in others),
            wrap=self.wrap(site.name),
            server_tls=self.server_tls(site.name),
            accounts=render_accounts(self.stores, self.roles(site.name)),
            system_listen=f"127.0.0.1:{SYSTEM_PORT}",
        )

    def start_secure(self) -> None:
        for name in self.members:
            site = self.sites[name]
            site.nats = self.secure_node(name)
            site.nats.start()

    def start_rogue(self) -> SecureNode:
        """The rogue server: its own CA (trusted by nobody), routes to every member, and it
        trusts the members' (public) bundle so that the members do judge its certificate."""
        assert self.rogue is not None
        site = self.sites[self.rogue]
        trusts = self.pki.concat("rogue-trusts.pem", self.bundle, self.pki.ca_cert(self.rogue))
        cert, key = self.leaf(self.rogue, "nats")
        tls = ServerTls(cert, key, client_ca_file=trusts, route_ca_file=trusts)
        node = dataclasses.replace(
            self.secure_node(self.rogue, peers=self.members),
            server_tls=tls,
            accounts=render_accounts(self.stores, Roles(site=self.rogue, agents=("n1",))),
        )
        site.nats = node
        node.start()
        return node

    def node(self, site: str) -> SecureNode:
        node = self.sites[site].nats
        assert isinstance(node, SecureNode)
        return node

    # --- clients -----------------------------------------------------------------------

    def agent_context(
        self, site: str, node: str = "n1", server_ca: str | None = None
    ) -> ssl.SSLContext:
        cert, key = self.leaf(site, node)
        return client_context(self.pki.ca_cert(server_ca or site), cert, key)

    def person_context(self, site: str, user: str) -> ssl.SSLContext:
        cert, key = self.leaf("operators", user)
        return client_context(self.pki.ca_cert(site), cert, key)

    async def connect_agent(self, site: str, node: str = "n1", **kw: object) -> Client:
        return await nats.connect(
            servers=[self.node(site).url],
            tls=self.agent_context(site, node),
            inbox_prefix=agent_inbox_prefix(site, node),
            connect_timeout=3,
            max_reconnect_attempts=0,
            allow_reconnect=False,
            **kw,  # type: ignore[arg-type]
        )

    async def connect_person(self, site: str, user: str, **kw: object) -> Client:
        return await nats.connect(
            servers=[self.node(site).url],
            tls=self.person_context(site, user),
            inbox_prefix=user_inbox_prefix(user),
            connect_timeout=3,
            max_reconnect_attempts=0,
            allow_reconnect=False,
            **kw,  # type: ignore[arg-type]
        )
