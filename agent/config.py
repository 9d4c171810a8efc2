"""The agent configuration of CONTRACT section 3.

Precedence, highest first: ``HARMONY_AGENT_*`` environment variables (nested with ``__``),
the YAML file, the defaults. Every error becomes one line naming the field, because an
operator reading a crash-looping unit's journal at 3 a.m. should not parse a traceback.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

# Re-exported: code written before agent.patterns imports them from here.
from agent.patterns import NODE_PATTERN as NODE_PATTERN  # noqa: PLC0414
from agent.patterns import SITE_PATTERN as SITE_PATTERN  # noqa: PLC0414
from agent.timing import Timing
from agent.yaml_errors import yaml_error
from mesh.tlsfiles import FileProblem, check_pair, load_certificates, private
from scores.duration import Duration
from topologies.config import LocalhostConfig, TopologyConfig

ENV_PREFIX = "HARMONY_AGENT_"
CONFIG_ENV = "HARMONY_AGENT_CONFIG"
ZERO_CONFIG_OFF = (
    "HARMONY_AGENT_NATS",
    "HARMONY_AGENT_NATS__SERVERS",
    "HARMONY_AGENT_NATS__EMBEDDED",
)
"""Variables that point the agent at a mesh of its own choosing: with any of them set, the
zero-configuration local defaults (an embedded single-node mesh) no longer apply."""


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line the operator will read."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_CHECK_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("check_files", default=True)
"""Off only where the files cannot exist yet (a generator checking the config it renders)."""


def _file_check(check: Callable[[Path], object], path: Path | None) -> Path | None:
    """Run a mesh.tlsfiles check; its one-line problem becomes the field's error."""
    if path is not None and _CHECK_FILES.get():
        try:
            check(path)
        except FileProblem as exc:
            raise ValueError(str(exc)) from None
    return path


class TlsConfig(_Section):
    """The agent's client TLS: ``ca_file`` verifies servers, ``cert_file``/``key_file`` are
    this agent's identity (``CN=<node>,OU=<site>,O=harmony``), renewed in place."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("ca_file", "cert_file")
    @classmethod
    def _certs(cls, path: Path | None) -> Path | None:
        return _file_check(load_certificates, path)

    @field_validator("key_file")
    @classmethod
    def _key(cls, path: Path | None) -> Path | None:
        return _file_check(private, path)

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if self.cert_file is not None and self.key_file is not None and _CHECK_FILES.get():
            try:
                check_pair(self.cert_file, self.key_file)
            except FileProblem as exc:
                raise ValueError(str(exc)) from None
        return self


class ServerTlsConfig(_Section):
    """The embedded nats-server's mTLS (issue 11): its certificate and whom it trusts."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path
    """CAs whose leaves may connect as clients: this site's CA plus the operators' CA only,
    so another site's CA can mint no identity this server accepts."""
    route_ca_file: Path | None = None
    """The federated trust bundle, for routes (set ``trust.bundle_file`` to the same path
    so the agent keeps it current); required with ``cluster_listen``."""

    @field_validator("cert_file", "client_ca_file", "route_ca_file")
    @classmethod
    def _certs(cls, path: Path | None) -> Path | None:
        return _file_check(load_certificates, path)

    @field_validator("key_file")
    @classmethod
    def _key(cls, path: Path) -> Path:
        _file_check(private, path)
        return path

    @model_validator(mode="after")
    def _pair(self) -> ServerTlsConfig:
        if _CHECK_FILES.get():
            try:
                check_pair(self.cert_file, self.key_file)
            except FileProblem as exc:
                raise ValueError(str(exc)) from None
        return self


class AccountsConfig(_Section):
    """Who may connect to the embedded server, by role (rendered by ``mesh.authz``)."""

    stores: list[str] | None = Field(default=None, min_length=1)
    """The mesh's lease stores (bucket ``harmony-leases-<store>`` each), as in the
    descriptor; default: ``mesh.stores``."""
    agents: list[str] = Field(default_factory=list)
    """Agents that connect here: ``<node>`` of this site (the server's own node is always
    one), or ``<site>/<node>`` of a site without its own server, whose CA this server then
    trusts for clients for as long as the signed trust bundle does."""
    operators: list[str] = Field(default_factory=list)
    viewers: list[str] = Field(default_factory=list)
    trust_admins: list[str] = Field(default_factory=list)
    admins: list[str] = Field(default_factory=list)

    @field_validator("stores")
    @classmethod
    def _stores(cls, names: list[str] | None) -> list[str] | None:
        for name in names or ():
            if not re.match(SITE_PATTERN, name):
                raise ValueError(f"{name!r} must match {SITE_PATTERN}")
        return names

    @field_validator("operators", "viewers", "trust_admins", "admins")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.match(NODE_PATTERN, name):
                raise ValueError(f"{name!r} must match {NODE_PATTERN}")
        return names

    @field_validator("agents")
    @classmethod
    def _nodes(cls, names: list[str]) -> list[str]:
        for name in names:
            site, _, node = name.rpartition("/")
            if site and not re.match(SITE_PATTERN, site):
                raise ValueError(f"{name!r}: site must match {SITE_PATTERN}")
            if not re.match(NODE_PATTERN, node):
                raise ValueError(f"{name!r}: node must match {NODE_PATTERN}")
        return names


def _loopback(listen: str) -> bool:
    from mesh.embedded import is_loopback

    return is_loopback(listen)


class NatsConfig(_Section):
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1)
    tls: TlsConfig | None = None
    credentials: Path | None = None
    """A NATS ``.creds`` file (JWT + nkey seed); must not be world-readable."""
    user: str | None = None
    password_file: Path | None = None
    """With ``user``: the password's first line; never in a URL, a log or a status."""
    insecure: bool = False
    """Allow an embedded listener beyond loopback without TLS (default: refused, exit 2)."""
    embedded: bool = False
    # The fields below shape the embedded nats-server (ignored unless embedded is true).
    server_tls: ServerTlsConfig | None = None
    accounts: AccountsConfig | None = None
    system_listen: str = "127.0.0.1:4223"
    """Loopback websocket for this agent's system-account user (it kicks evicted
    connections); only rendered with ``accounts``; must be loopback."""
    listen: str = "127.0.0.1:4222"
    monitor_listen: str = "127.0.0.1:8222"
    cluster_listen: str | None = None
    """host:port for cluster routes; needed to join peers (``routes``)."""
    cluster_name: str = "harmony"
    routes: list[str] = Field(default_factory=list)
    """Peer route URLs, e.g. ``nats-route://10.0.0.2:6222``; with ``server_tls`` DNS names
    that the peers' certificates carry (only known mesh servers may route)."""
    connect_timeout: Duration = 2.0

    @field_validator("servers")
    @classmethod
    def _urls(cls, servers: list[str]) -> list[str]:
        for url in servers:
            if "://" not in url:
                raise ValueError(f"{url!r} is not a URL like nats://host:4222")
            if "@" in url.split("://", 1)[1].split("/", 1)[0]:
                raise ValueError(
                    "credentials in a server URL would be logged; use nats.user + "
                    "nats.password_file or nats.credentials"
                )
        return servers

    @field_validator("credentials", "password_file")
    @classmethod
    def _secret(cls, path: Path | None) -> Path | None:
        return _file_check(private, path)

    @field_validator("listen", "cluster_listen", "monitor_listen")
    @classmethod
    def _no_plaintext_beyond_loopback(cls, listen: str | None, info: ValidationInfo) -> str | None:
        data = info.data
        if listen is None or not data.get("embedded") or data.get("insecure"):
            return listen
        if _loopback(listen):
            return listen
        if info.field_name == "monitor_listen":
            raise ValueError(
                f"{listen} is not loopback; monitoring is plain HTTP (set nats.insecure: true "
                "to allow it)"
            )
        if data.get("server_tls") is None:
            raise ValueError(
                f"{listen} is not loopback and nats.server_tls is not set (set it, or "
                "nats.insecure: true to allow plaintext)"
            )
        return listen

    @field_validator("system_listen")
    @classmethod
    def _system_loopback(cls, listen: str) -> str:
        if listen and not _loopback(listen):
            raise ValueError(f"{listen} must be a loopback address")
        return listen

    @field_validator("routes")
    @classmethod
    def _route_hosts(cls, routes: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("server_tls") is None:
            return routes
        for url in routes:
            host = urlsplit(url).hostname or ""
            try:
                ipaddress.ip_address(host)
            except ValueError:
                continue
            raise ValueError(
                f"{url}: with server_tls, route hosts must be DNS names carried by the "
                "peers' certificates (verify_cert_and_check_known_urls)"
            )
        return routes

    @model_validator(mode="after")
    def _auth(self) -> NatsConfig:
        if (self.user is None) != (self.password_file is None):
            raise ValueError("user and password_file must be given together")
        if self.credentials is not None and self.user is not None:
            raise ValueError("give credentials or user + password_file, not both")
        if (
            self.embedded
            and self.server_tls is not None
            and self.cluster_listen
            and self.server_tls.route_ca_file is None
        ):
            raise ValueError("server_tls.route_ca_file is required with cluster_listen")
        if self.embedded and self.server_tls is not None and self.accounts is None:
            raise ValueError(
                "server_tls needs accounts (clients are mapped to users from their certificate)"
            )
        return self


class MeshConfig(_Section):
    replicas: int = Field(default=3, ge=1, le=5)
    """Replicas of harmony-state, harmony-trust and the events stream."""
    stores: list[str] | None = None
    """The lease stores (site names, one single-replica store each, on a server tagged
    ``site:<name>``): only the agent that creates the mesh needs it; others read the mesh
    descriptor and refuse to start if theirs differs. Default when alone on a
    non-clustered server: ``[<own site>]``."""
    bootstrap: bool = True
    """Create missing buckets and stores (needs JetStream admin rights); false: bind only,
    wait for `harmony-agent mesh init`."""

    @field_validator("stores")
    @classmethod
    def _store_names(cls, stores: list[str] | None) -> list[str] | None:
        import re

        if stores is not None:
            if not stores:
                raise ValueError("must name at least one store")
            for name in stores:
                if not re.match(SITE_PATTERN, name):
                    raise ValueError(f"{name!r} is not a site name ([a-z0-9-]{{1,63}})")
            if len(set(stores)) != len(stores):
                raise ValueError("stores must not repeat")
        return stores


class LeaseConfig(_Section):
    ttl: Duration = 10.0
    margin: Duration | None = None
    """Safety margin subtracted from the holder's deadline; default ttl/10 (at least 50 ms)."""

    @field_validator("ttl")
    @classmethod
    def _ttl_floor(cls, ttl: float) -> float:
        if ttl < 0.3:
            raise ValueError("must be at least 300ms")
        return ttl

    @property
    def effective_margin(self) -> float:
        return self.margin if self.margin is not None else max(0.05, self.ttl / 10)


class HealthConfig(_Section):
    listen: str = "127.0.0.1:9808"
    """host:port for /healthz /readyz /metrics; an empty string disables the endpoint."""


class TrustConfig(_Section):
    bundle_file: Path | None = None
    """Keep this file equal to the mesh's trust bundle (and reload the embedded server)."""
    admin_public_key: str | None = None
    """The trust-admin's Ed25519 public key (``ed25519:<base64>``, printed by ``harmony-agent
    ca trust-admin-init``): only ``ca.<site>`` entries it signed are trusted."""
    site_ca_file: Path | None = None
    """This site's CA certificate: always in this node's bundle, whatever the mesh says."""
    ca_dir: Path | None = None
    """Where this site's CA key lives (bare metal, root only): when readable, the agent
    renews its own and its server's leaves before 2/3 of their life."""
    bundle_configmap: str | None = None
    """``<namespace>/<name>`` (Kubernetes topology): the agent also writes the bundle into
    this ConfigMap's ``ca-bundle.pem``, which the NATS pods' reloader puts to use."""

    @field_validator("bundle_configmap")
    @classmethod
    def _configmap(cls, value: str | None) -> str | None:
        name = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
        if value is not None and not re.fullmatch(f"{name}/{name}", value):
            raise ValueError(f"{value!r} must be <namespace>/<name> of a ConfigMap")
        return value

    @field_validator("admin_public_key")
    @classmethod
    def _admin_key(cls, value: str | None) -> str | None:
        if value is not None:
            from mesh.trust import TrustError, parse_admin_public_key

            try:
                parse_admin_public_key(value)
            except TrustError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("site_ca_file")
    @classmethod
    def _site_ca(cls, path: Path | None) -> Path | None:
        return _file_check(load_certificates, path)

    @model_validator(mode="after")
    def _signed(self) -> TrustConfig:
        if self.bundle_file is not None and self.admin_public_key is None:
            raise ValueError(
                "bundle_file needs admin_public_key (only signed trust entries are used)"
            )
        return self


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """auto: JSON when stderr is not a terminal (journald, kubectl logs), console otherwise."""


class ControllerConfig(_Section):
    max_failures: int = Field(default=3, ge=1)
    """Consecutive Score failures after which the holder releases the lease."""


NODE_HOSTNAME_ENV = "HARMONY_NODE_HOSTNAME"
"""Host name the default node name is derived from, instead of this machine's: the
Kubernetes DaemonSet sets it to ``spec.nodeName`` (the pod's own host name is the pod's)."""


def node_from_hostname(hostname: str) -> str:
    """A valid node name ([a-z0-9_-]{1,63}) for a host name or FQDN.

    The first DNS label, lower-cased: ``ip-10-0-1-23.eu-west-1.compute.internal`` gives
    ``ip-10-0-1-23`` (a cluster's node names differ in their first label). When the label
    itself must be altered (other characters, longer than 63, empty), the result ends with
    8 hex digits of the full name's sha256, so two such names never meet on one node name.
    """
    raw = hostname.strip()
    label = raw.split(".")[0].lower()
    cleaned = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "-" for c in label)
    if cleaned == label and 0 < len(cleaned) <= 63:
        return cleaned
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    stem = cleaned[: 63 - len(digest) - 1].strip("-_")
    return f"{stem}-{digest}" if stem else f"node-{digest}"


def default_node() -> str:
    return node_from_hostname(os.environ.get(NODE_HOSTNAME_ENV) or socket.gethostname())


class AgentConfig(BaseSettings):
    """Everything one agent needs to know about itself."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    site: str = Field(pattern=SITE_PATTERN)
    node: str = Field(default_factory=default_node, pattern=NODE_PATTERN)
    state_dir: Path = Path("/var/lib/harmony-agent")
    nats: NatsConfig = Field(default_factory=NatsConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    topology: TopologyConfig = Field(default_factory=LocalhostConfig)

    @field_validator("site")
    @classmethod
    def _not_reserved(cls, site: str) -> str:
        if site == "app":
            raise ValueError("'app' is reserved (harmony.cmd.app.<name> addresses applications)")
        if site == "operators":
            raise ValueError("'operators' is reserved (the OU of people's certificates)")
        return site

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats the file (which arrives as init kwargs).
        return (env_settings, init_settings)

    @property
    def agent_id(self) -> str:
        return f"{self.site}/{self.node}"

    @property
    def timing(self) -> Timing:
        topo = self.topology
        command = getattr(topo, "command_timeout", None) or getattr(topo, "request_timeout", None)
        return Timing.from_ttl(self.lease.ttl, self.lease.margin, command)

    @model_validator(mode="after")
    def _accounts(self) -> AgentConfig:
        """Per-identity accounts: the stores default to ``mesh.stores``, and an agent may
        not create buckets (an admin does, ``harmony-agent mesh init``): it binds."""
        accounts = self.nats.accounts
        if accounts is None or not self.nats.embedded:
            return self
        if accounts.stores is None:
            if self.mesh.stores is None:
                raise ValueError(
                    "nats.accounts.stores: name the mesh's lease stores (or set mesh.stores)"
                )
            accounts.stores = list(self.mesh.stores)
        if self.mesh.bootstrap:
            if "bootstrap" in self.mesh.model_fields_set:
                raise ValueError(
                    "mesh.bootstrap: must be false with nats.accounts (agents may not create "
                    "buckets; an admin runs `harmony-agent mesh init`)"
                )
            self.mesh.bootstrap = False
        return self

    @model_validator(mode="after")
    def _timing_rules(self) -> AgentConfig:
        timing = self.timing
        broken = timing.violations()
        if broken:
            raise ValueError(broken[0])
        field = "request_timeout" if self.topology.kind == "kubernetes" else "command_timeout"
        if getattr(self.topology, field) is None:
            self.topology = self.topology.model_copy(update={field: timing.command_timeout})
        return self


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "field required"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc or 'config'}: {msg}{more}"


def zero_config_blockers() -> list[str]:
    """The variables that switch the zero-configuration defaults off (see ZERO_CONFIG_OFF)."""
    return sorted(k for k in os.environ if k.upper() in ZERO_CONFIG_OFF)


def _connectable(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"nats://{host}:{port}"


def local_defaults() -> dict[str, Any]:
    """The zero-configuration agent: one embedded single-node mesh under the user's data dir."""
    import platformdirs

    return {
        "site": "local",
        "state_dir": str(platformdirs.user_data_path("harmony-agent")),
        "nats": {"embedded": True},
        "mesh": {"replicas": 1},
    }


def load_config(
    path: str | Path | None = None, *, allow_zero_config: bool = False, check_files: bool = True
) -> AgentConfig:
    """Load and validate; raise ConfigError with one line naming the file, field and problem.

    ``check_files=False`` skips reading the TLS, key and secret files the config names (their
    existence, permissions, pairing): for checking a config that is meant for another
    machine, such as one ``harmony-agent manifests`` generates."""
    path = path or os.environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    where = "environment"
    if path:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_error(str(path), exc)) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of fields at the top level")
        data = loaded
    zero_config = False
    if not path and allow_zero_config:
        blockers = zero_config_blockers()
        if blockers:
            where = f"environment (zero-config off: {', '.join(blockers)} is set)"
        else:
            data, zero_config = local_defaults(), True
            where = "built-in local defaults"
    token = _CHECK_FILES.set(check_files)
    try:
        config = AgentConfig(**data)
    except ValidationError as exc:
        loc = [str(p) for p in exc.errors()[0]["loc"]]
        env_name = ENV_PREFIX + "__".join(loc[:2]).upper()
        if env_name in os.environ:
            where = env_name
        raise ConfigError(f"{where}: {_format_error(exc)}") from None
    except SettingsError as exc:
        raise ConfigError(
            f"environment: {exc} (lists and mappings are JSON, e.g. "
            """HARMONY_AGENT_NATS__SERVERS='["nats://10.0.0.1:4222"]')"""
        ) from None
    finally:
        _CHECK_FILES.reset(token)
    if zero_config:
        # The local agent connects to the server it embeds, wherever HARMONY_AGENT_NATS__LISTEN
        # moved it (servers cannot be set here: that variable switches zero-config off).
        nats = config.nats.model_copy(update={"servers": [_connectable(config.nats.listen)]})
        config = config.model_copy(update={"nats": nats})
    return config
