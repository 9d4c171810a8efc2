"""Real PostgreSQL instances on this machine, driven through the Interpret (no agent).

Each node gets its own directory under a short /tmp path (Unix socket paths are limited to
107 bytes, and the database's OS user must be able to traverse every parent, which pytest's
0700 tmp_path is not) and its own port. Tests skip with a reason when PostgreSQL's server
binaries are missing; ``.ci/run`` installs them.
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import os
import pwd
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mesh.trust import SiteCA, cert_pem
from scores.base import Deadline, RunContext
from scores.postgres import PostgresSpec
from scores.postgres.interpret import PostgresInterpret
from scores.roles import PrimaryInfo
from tests.harness.ports import free_port
from tests.topologies.conftest import sshd  # noqa: F401 - the real sshd fixture, reused
from topologies.base import Topology
from topologies.capabilities import HostShell
from topologies.localhost import LocalhostTopology

APP = "ledger"


def postgres_skip_reason() -> str | None:
    found = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or shutil.which("pg_ctl")
    if not found:
        return "needs PostgreSQL server binaries (Debian: apt-get install postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs the postgres OS user (created by postgresql-15)"
    return None


def os_user() -> str:
    return "postgres" if os.geteuid() == 0 else getpass.getuser()


@pytest.fixture(scope="session")
def require_postgres() -> None:
    reason = postgres_skip_reason()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def make_workdir() -> Iterator[Path]:
    """A short, world-traversable directory under /tmp, removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="hpg", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        if not os.environ.get("HARMONY_KEEP_PG"):  # keep logs for a post-mortem
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def workdir(require_postgres: None) -> Iterator[Path]:
    with make_workdir() as base:
        yield base


@dataclass(frozen=True)
class Certs:
    """Two site CAs; node certificates with CN = the replication user, SAN = loopback."""

    bundle: Path
    files: dict[str, tuple[Path, Path]]

    def tls(self, site: str) -> dict[str, str]:
        cert, key = self.files[site]
        return {"ca_file": str(self.bundle), "cert_file": str(cert), "key_file": str(key)}


def make_certs(base: Path) -> Certs:
    base.mkdir(parents=True, exist_ok=True)
    cas = {site: SiteCA.create(site, base / site) for site in ("site-a", "site-b")}
    bundle = base / "bundle.pem"
    bundle.write_bytes(b"".join(cert_pem(ca.cert) for ca in cas.values()))
    files: dict[str, tuple[Path, Path]] = {}
    for index, site in enumerate(["a", "b", "c", "d"]):
        ca = cas["site-a" if index % 2 == 0 else "site-b"]
        cert, key = ca.issue("replicator", dns=["localhost"], ips=["127.0.0.1"])
        cert_path, key_path = base / f"{site}.crt", base / f"{site}.key"
        cert_path.write_bytes(cert_pem(cert))
        key_path.write_bytes(key)
        key_path.chmod(0o600)  # root-only: the Score copies it for postgres
        files[site] = (cert_path, key_path)
    return Certs(bundle, files)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pgcerts"))


@dataclass
class Node:
    name: str
    interpret: PostgresInterpret
    state_dir: Path
    port: int
    token: int = 1

    def ctx(self, token: int | None = None, deadline: float | None = None) -> RunContext:
        at = Deadline(deadline) if deadline is not None else None
        return RunContext(APP, self.name, "n1", token or self.token, self.state_dir, at)

    @property
    def dsn(self) -> str:
        """Direct connection (any role), as the test's superuser over TCP."""
        return f"host=127.0.0.1 port={self.port} dbname=postgres user={os_user()} connect_timeout=3"

    @property
    def data_dir(self) -> Path:
        return Path(self.interpret.layout.data_dir)

    @property
    def run_dir(self) -> Path:
        return Path(self.interpret.layout.run_dir)

    def info(self, token: int | None = None) -> PrimaryInfo:
        end = self.interpret.endpoint()
        return PrimaryInfo(self.name, "n1", end["host"], end["port"], token or self.token)

    @property
    def application_name(self) -> str:
        name = self.interpret.application_name
        assert name is not None
        return name


@dataclass
class Cluster:
    """Makes nodes; every node is stopped when the test ends."""

    workdir: Path
    certs: Certs
    nodes: list[Node] = field(default_factory=list)
    topology: Topology | None = None

    def spec(self, *, tls: bool = True, port: int | None = None, **fields: Any) -> PostgresSpec:
        base: dict[str, Any] = {
            "kind": "PostgreSQL",
            "port": port or free_port(),
            "listen": "127.0.0.1",
            "os_user": os_user(),
            "hba": ["host all all 127.0.0.1/32 trust"],
            "stop_timeout": "10s",
            "start_timeout": "30s",
            "basebackup_timeout": "60s",
        }
        if tls:
            base["tls"] = self.certs.tls("a")
        else:
            password = self.workdir / "replication.password"
            password.write_text("correct-horse-battery\n")
            password.chmod(0o600)
            base["replication_password_file"] = str(password)
        base.update(fields)
        return PostgresSpec.model_validate(base)

    def node(self, name: str, *, shell: HostShell | None = None, **fields: Any) -> Node:
        spec = self.spec(**fields)
        if spec.tls is not None and "tls" not in fields and name in self.certs.files:
            spec = spec.model_copy(update={"tls": spec.tls.model_copy(update=self.certs.tls(name))})
        interpret = spec.interpret(shell or LocalhostTopology())
        state_dir = self.workdir / name
        node = Node(name, interpret, state_dir, spec.port)
        self.nodes.append(node)
        return node

    async def primary(self, name: str = "a", token: int = 5, **fields: Any) -> Node:
        node = self.node(name, **fields)
        node.token = token
        outcome = await node.interpret.start_primary(node.ctx())
        assert outcome.ok, outcome
        return node

    async def replica(self, name: str, primary: Node, **fields: Any) -> Node:
        node = self.node(name, **fields)
        node.token = primary.token
        outcome = await node.interpret.start_replica(node.ctx(), primary.info())
        assert outcome.ok, outcome
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.interpret.stop()
            await node.interpret.close()


@pytest.fixture
async def cluster(workdir: Path, certs: Certs) -> AsyncIterator[Cluster]:
    made = Cluster(workdir, certs)
    try:
        yield made
    finally:
        await made.close()
