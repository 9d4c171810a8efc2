"""A site's nats-server configuration as typed values (SPEC v2), for `harmony-agent manifests`.

Rendered to nats-server's config syntax (JSON-like; ``$NAME`` is an environment reference,
kept unquoted). ``nats-server -t`` checks the result in the tests.

Permissions are not written here: ``mesh.authz`` is the one place that knows what each role
may publish and subscribe (the embedded server, ``ca accounts`` and these manifests all
render its users). Every key an agent writes contains its own ``<site>.<node>``, so one
agent's user may write its own keys and nothing else; NATS wildcards match whole tokens
only, so the per-store lease buckets (``harmony-leases-<store>``) are listed one by one:
``stores`` is the mesh's store list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mesh import authz
from mesh.authz import Permissions as Permissions  # noqa: PLC0414 (re-exported)
from mesh.authz import User as User  # noqa: PLC0414 (re-exported)


def inbox_prefix(site: str, node: str) -> str:
    return f"_INBOX_{site}_{node}"


def agent_permissions(site: str, node: str, stores: Sequence[str]) -> Permissions:
    """SPEC v2, role agent <site>/<node> (``mesh.authz.agent_permissions``)."""
    return authz.agent_permissions(authz.MeshNames(tuple(stores)), site, node)


def operator_permissions(user: str, stores: Sequence[str]) -> Permissions:
    return authz.operator_permissions(authz.MeshNames(tuple(stores)), user)


def viewer_permissions(stores: Sequence[str], user: str = "viewer") -> Permissions:
    return authz.viewer_permissions(authz.MeshNames(tuple(stores)), user)


def trust_admin_permissions(stores: Sequence[str], user: str = "trust-admin") -> Permissions:
    del stores  # a trust-admin reads and writes harmony-trust only
    return authz.trust_admin_permissions(user)


def admin_permissions(user: str = "admin") -> Permissions:
    """Creates buckets and streams: the only JetStream admin."""
    return authz.admin_permissions(user)


@dataclass(frozen=True)
class TlsBlock:
    cert_file: str
    key_file: str
    ca_file: str
    verify: bool = False
    verify_and_map: bool = False
    verify_cert_and_check_known_urls: bool = False
    timeout: float = 5.0


@dataclass(frozen=True)
class ClusterBlock:
    name: str
    listen: str
    routes: tuple[str, ...]
    tls: TlsBlock
    no_advertise: bool = True


@dataclass(frozen=True)
class Env:
    """An environment reference (``$NAME``), rendered unquoted."""

    name: str


@dataclass(frozen=True)
class NatsServerConf:
    server_name: str | Env
    listen: str
    monitor_listen: str
    tags: tuple[str, ...]
    store_dir: str
    pid_file: str
    tls: TlsBlock
    cluster: ClusterBlock | None
    """None: one non-clustered server (a single-server site without peers)."""
    users: tuple[User, ...] = ()
    unique_tag: str = "site:"
    ping_interval: str = "1s"
    ping_max: int = 3
    lame_duck_duration: str = "30s"
    extra_comments: tuple[str, ...] = field(default=())


def _q(value: str | Env) -> str:
    if isinstance(value, Env):
        return f"${value.name}"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(values: Iterable[str], indent: str) -> str:
    items = [f"{indent}  {_q(v)}" for v in values]
    return "[\n" + "\n".join(items) + f"\n{indent}]"


def _tls(tls: TlsBlock, indent: str) -> list[str]:
    lines = [
        f"{indent}tls {{",
        f"{indent}  cert_file: {_q(tls.cert_file)}",
        f"{indent}  key_file: {_q(tls.key_file)}",
        f"{indent}  ca_file: {_q(tls.ca_file)}",
        f"{indent}  timeout: {tls.timeout}",
    ]
    if tls.verify:
        lines.append(f"{indent}  verify: true")
    if tls.verify_and_map:
        lines.append(f"{indent}  verify_and_map: true")
    if tls.verify_cert_and_check_known_urls:
        lines.append(f"{indent}  verify_cert_and_check_known_urls: true")
    return [*lines, f"{indent}}}"]


def _user(user: User) -> list[str]:
    return authz.render_user(user, "    ").split("\n")


def render(conf: NatsServerConf) -> str:
    lines = [f"# {c}" for c in conf.extra_comments]
    lines += [
        f"server_name: {_q(conf.server_name)}",
        f"listen: {_q(conf.listen)}",
        "# Monitoring on the pod's loopback only (probes exec inside the pod).",
        f"http: {_q(conf.monitor_listen)}",
        f"pid_file: {_q(conf.pid_file)}",
        "# Drop a silently dead route within ~3 s and redial it every second, so a healed",
        "# partition reconnects at once (SplitBrainAllowed reconcile depends on it).",
        f"ping_interval: {_q(conf.ping_interval)}",
        f"ping_max: {conf.ping_max}",
        f"lame_duck_duration: {_q(conf.lame_duck_duration)}",
        "server_tags: [" + ", ".join(_q(t) for t in conf.tags) + "]",
        "jetstream {",
        f"  store_dir: {_q(conf.store_dir)}",
        "  # Jepsen lost acknowledged writes with the default fsync: fsync every write.",
        "  sync_interval: always",
        "  # R3 streams put their replicas on three different sites.",
        f"  unique_tag: {_q(conf.unique_tag)}",
        "}",
        "# Clients: mTLS, each certificate mapped to one user (its e-mail SAN).",
        *_tls(conf.tls, ""),
        "authorization {",
        "  users: [",
    ]
    for user in conf.users:
        lines += _user(user)
    lines += ["  ]", "}"]
    c = conf.cluster
    if c is None:
        return "\n".join(lines) + "\n"
    lines += [
        "# Routes: mTLS, and only servers whose certificate names a configured route URL.",
        "cluster {",
        f"  name: {_q(c.name)}",
        f"  listen: {_q(c.listen)}",
        f"  no_advertise: {'true' if c.no_advertise else 'false'}",
        f"  routes: {_list(c.routes, '  ')}",
        *_tls(c.tls, "  "),
        "}",
    ]
    return "\n".join(lines) + "\n"
