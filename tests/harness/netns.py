"""Sites in network namespaces: each site its own network stack, joined by a bridge.

Layout (all created by the test, torn down even when it fails)::

    ns <tag>-hub:  bridge br0 ── veth ── ns <tag>-<i> (data0 10.200.0.<i+1>/24)
    root ns:       veth m<tag><i> 10.201.<k>.<4i+1>/30 ── ns <tag>-<i> mgmt0 (.<4i+2>)

The data network carries everything between sites and is what ``cut``/``heal`` take down
and up (the bridge-side veth, so both directions go dark at once, with no RST: a real
partition). The management links let the test process reach every site even while it is
cut off, to read its health or its nats-server; they never route between sites. Every
address lives only on interfaces inside namespaces this harness created.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.nats import NatsNode

DATA_NET = "10.200.0"
MGMT_NET = "10.201"
LOCK = Path("/tmp/harmony-netns.lock")
ACCOUNTS = """accounts {
  SYS: { users: [{user: sys, password: sys}] }
  HARMONY: { jetstream: enabled, users: [{user: harmony, password: harmony}] }
}
system_account: SYS
no_auth_user: harmony
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Site:
    name: str
    index: int
    ns: str
    data_ip: str
    mgmt_ip: str
    bridge_port: str
    nats: NatsNode | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """NATS client URL reachable from the test process (via the management link)."""
        return f"nats://{self.mgmt_ip}:4222"

    @property
    def local_url(self) -> str:
        """NATS client URL for processes inside the site."""
        return "nats://127.0.0.1:4222"


class Sites:
    """Three (or n) sites; create with ``setup()``, destroy with ``teardown()``."""

    def __init__(self, workdir: Path, names: tuple[str, ...] = ("site-a", "site-b", "site-c")):
        self.workdir = workdir
        self.tag = f"h{os.getpid() % 100000:05d}"
        self.hub = f"{self.tag}-hub"
        self.names = names
        self.sites: dict[str, Site] = {}
        self._k = 0

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    def _pick_mgmt_octet(self) -> int:
        used = _ip("-o", "-4", "addr", "show").stdout
        for k in range(1, 255):
            if f" {MGMT_NET}.{k}." not in used:
                return k
        raise RuntimeError("no free management subnet")

    def setup(self) -> None:
        LOCK.touch(exist_ok=True)
        with open(LOCK) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._k = self._pick_mgmt_octet()
            self._create()

    def _create(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns = f"{self.tag}-{i}"
            site = Site(
                name=name,
                index=i,
                ns=ns,
                data_ip=f"{DATA_NET}.{i + 1}",
                mgmt_ip=f"{MGMT_NET}.{self._k}.{4 * i + 2}",
                bridge_port=f"b{self.tag}{i}",
            )
            self.sites[name] = site
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Data link: site <-> hub bridge.
            d = f"d{self.tag}{i}"
            _ip("link", "add", d, "type", "veth", "peer", "name", site.bridge_port)
            _ip("link", "set", d, "netns", ns)
            _ip("link", "set", site.bridge_port, "netns", self.hub)
            _ip("-n", ns, "link", "set", d, "name", "data0")
            _ip("-n", ns, "addr", "add", f"{site.data_ip}/24", "dev", "data0")
            _ip("-n", ns, "link", "set", "data0", "up")
            _ip("-n", self.hub, "link", "set", site.bridge_port, "master", "br0")
            _ip("-n", self.hub, "link", "set", site.bridge_port, "up")
            # Management link: root <-> site, never cut.
            m, peer = f"m{self.tag}{i}", f"n{self.tag}{i}"
            net = ipaddress.ip_network(f"{MGMT_NET}.{self._k}.{4 * i}/30")
            host_ip = str(net.network_address + 1)
            _ip("link", "add", m, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("-n", ns, "link", "set", peer, "name", "mgmt0")
            _ip("-n", ns, "addr", "add", f"{site.mgmt_ip}/30", "dev", "mgmt0")
            _ip("-n", ns, "link", "set", "mgmt0", "up")
            _ip("addr", "add", f"{host_ip}/30", "dev", m)
            _ip("link", "set", m, "up")

    def wrap(self, name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.sites[name].ns)

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Run a process inside the site; it is killed at teardown if still running."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            [*self.wrap(name), *argv],
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        if log:
            out.close()  # type: ignore[union-attr]
        self.sites[name].procs.append(proc)
        return proc

    def cut(self, name: str) -> None:
        """Partition the site from every other site (both directions, no RST)."""
        _ip("-n", self.hub, "link", "set", self.sites[name].bridge_port, "down")

    def heal(self, name: str) -> None:
        _ip("-n", self.hub, "link", "set", self.sites[name].bridge_port, "up")

    def start_nats(self, cluster_name: str = "harmony") -> None:
        """One nats-server per site, forming a stretched 3-node JetStream cluster.

        Clients without credentials land in the JetStream account; a ``sys`` user reaches
        the system account (to move the meta leader where a test wants it)."""
        for site in self.sites.values():
            routes = tuple(
                f"nats-route://{o.data_ip}:6222" for o in self.sites.values() if o is not site
            )
            site.nats = NatsNode(
                name=f"n-{site.name}",
                workdir=self.workdir / site.name / "nats",
                host=site.mgmt_ip,
                bind="0.0.0.0",
                port=4222,
                monitor_port=8222,
                cluster_port=6222,
                routes=routes,
                wrap=self.wrap(site.name),
                tags=(f"site:{site.name}",),
                extra=ACCOUNTS,
            )
            site.nats.start()

    def teardown(self) -> None:
        for site in self.sites.values():
            for proc in site.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if site.nats:
                site.nats.kill()
            pids = _ip("netns", "pids", site.ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", site.ns, check=False)
            for proc in site.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        _ip("netns", "del", self.hub, check=False)
        for i in range(len(self.names)):
            _ip("link", "del", f"m{self.tag}{i}", check=False)
