"""NATS users and permissions for the mesh's roles (issue 11; the names of SPEC-v2).

Pure functions: they turn *who may connect* (this site's agents, the people with a role)
into the ``accounts`` block a nats-server includes. Nothing here touches the network.

Identities come from certificates (``tls { verify_and_map: true }``): the NATS user *is*
the certificate's subject, ``CN=<node>,OU=<site>,O=harmony`` for an agent and
``CN=<user>,OU=operators,O=harmony`` for a person. A server lists only its own site's
agents, and its client listener trusts only its own site's CA (plus the operators' CA), so
another site's CA can mint no identity this server accepts.

Subject wildcards in NATS are whole tokens (``KV_harmony-*`` is a literal), so every
bucket and stream is named: the lease stores are passed in. The JetStream API subjects
granted are exactly those nats-py 2.16 sends for what an agent does (bind a bucket, get a
key, watch keys with an ordered push consumer, read its consumer info, flow control),
found by running those calls against a server that denied everything else; no role but
admin may create, update, delete, purge or step down anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

ORGANIZATION = "harmony"
PEOPLE_UNIT = "operators"
"""The OU of people's certificates (issued by the operators' CA)."""
ACCOUNT = "HARMONY"
SYSTEM_ACCOUNT = "SYS"
STATE_BUCKET = "harmony-state"
TRUST_BUCKET = "harmony-trust"
LEASES_PREFIX = "harmony-leases-"
LEASE_VIEW_BUCKET = "harmony-leases"
"""The contract's display-only view of holders (``mesh.mirror``); nothing decides from it."""
EVENTS_STREAM = "harmony-events"
NAME_RE = re.compile(r"^[a-z0-9-]{1,63}$")
NODE_RE = re.compile(r"^[a-z0-9_-]{1,63}$")
STANDARD = "STANDARD"
WEBSOCKET = "WEBSOCKET"


class AuthzError(ValueError):
    """A name that cannot be used in a subject, phrased for one line of output."""


def _name(kind: str, value: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    if not pattern.match(value):
        raise AuthzError(f"{kind} {value!r}: must match {pattern.pattern}")
    return value


def _site(site: str) -> str:
    if site == PEOPLE_UNIT:
        raise AuthzError(f"site {site!r} is reserved (the OU of people's certificates)")
    return _name("site", site)


def agent_identity(site: str, node: str) -> str:
    """The NATS user of agent ``site/node``: its certificate subject as nats-server prints it."""
    return f"CN={_name('node', node, NODE_RE)},OU={_site(site)},O={ORGANIZATION}"


def _user(user: str) -> str:
    return _name("user", user, NODE_RE)


def person_identity(user: str) -> str:
    return f"CN={_user(user)},OU={PEOPLE_UNIT},O={ORGANIZATION}"


def agent_inbox_prefix(site: str, node: str) -> str:
    """``_INBOX_<site>_<node>``: replies to this agent's requests, nobody else's."""
    return f"_INBOX_{_site(site)}_{_name('node', node, NODE_RE)}"


def user_inbox_prefix(user: str) -> str:
    """``_INBOX_user.<user>``; ``_INBOX_user`` has no second ``_`` so no agent prefix equals it."""
    return f"_INBOX_user.{_user(user)}"


@dataclass(frozen=True)
class Identity:
    """Who a client certificate says it is, as nats-server maps it (``verify_and_map``:
    the e-mail SAN first, else the subject): an agent ``site/node`` or a person ``user``."""

    user: str | None = None
    site: str | None = None
    node: str | None = None

    @property
    def inbox_prefix(self) -> str:
        if self.user is not None:
            return user_inbox_prefix(self.user)
        assert self.site is not None and self.node is not None
        return agent_inbox_prefix(self.site, self.node)


AGENT_EMAIL = re.compile(r"^(?P<node>[a-z0-9_-]{1,63})@agent\.(?P<site>[a-z0-9-]{1,63})\.harmony$")
ROLE_EMAIL = re.compile(r"^(?:operator-)?(?P<user>[a-z0-9_-]{1,63})@[a-z0-9-]{1,63}\.harmony$")
"""The Kubernetes generator's identities (``agent.deploy.site``): ``<node>@agent.<site>.harmony``
for an agent, ``operator-<user>@<site>.harmony`` / ``<role>@<site>.harmony`` for people."""


def identity_of(cert_file: str | None) -> Identity | None:
    """The harmony identity in this client certificate file (None: no certificate, or it
    names nobody the generated permissions know)."""
    if not cert_file:
        return None
    from pathlib import Path

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificates(Path(cert_file).read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        emails = san.get_values_for_type(x509.RFC822Name)
    except x509.ExtensionNotFound:
        emails = []
    try:
        if emails:
            agent = AGENT_EMAIL.match(emails[0])
            if agent:
                agent_inbox_prefix(agent["site"], agent["node"])  # validates
                return Identity(site=agent["site"], node=agent["node"])
            person = ROLE_EMAIL.match(emails[0])
            return Identity(user=person["user"]) if person else None
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if not cn or not ou:
            return None
        if ou[0].value == PEOPLE_UNIT:
            return Identity(user=_user(str(cn[0].value)))
        agent_inbox_prefix(str(ou[0].value), str(cn[0].value))  # validates
        return Identity(site=str(ou[0].value), node=str(cn[0].value))
    except AuthzError:
        return None


def inbox_prefix_for(cert_file: str | None) -> str | None:
    """The private inbox prefix the identity in this client certificate file is allowed
    (None when there is no certificate, or it names no harmony identity)."""
    identity = identity_of(cert_file)
    return identity.inbox_prefix if identity is not None else None


def leases_bucket(store: str) -> str:
    return LEASES_PREFIX + _name("store", store)


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


@dataclass(frozen=True)
class User:
    """One ``users`` entry. ``password`` None: a certificate identity (mapped, no password);
    a value starting with ``$`` is rendered as an environment reference, else quoted."""

    name: str
    permissions: Permissions | None
    password: str | None = None
    connection_types: tuple[str, ...] = (STANDARD,)


@dataclass(frozen=True)
class MeshNames:
    """The buckets and streams permissions are written for."""

    stores: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.stores:
            raise AuthzError("stores: at least one lease store is needed")
        for store in self.stores:
            _name("store", store)

    @property
    def lease_buckets(self) -> tuple[str, ...]:
        return tuple(leases_bucket(s) for s in self.stores)

    @property
    def kv_streams(self) -> tuple[str, ...]:
        buckets = (STATE_BUCKET, TRUST_BUCKET, LEASE_VIEW_BUCKET, *self.lease_buckets)
        return tuple(f"KV_{b}" for b in buckets)

    @property
    def streams(self) -> tuple[str, ...]:
        return (*self.kv_streams, EVENTS_STREAM)


def read_api(streams: Iterable[str]) -> tuple[str, ...]:
    """Read-only JetStream calls on ``streams``: bind, get (direct or not), watch.

    Observed from nats-py 2.16: ``key_value()`` sends STREAM.INFO.<s>; ``get`` sends
    STREAM.MSG.GET.<s> or, on buckets with direct access, DIRECT.GET.<s>[.<subject>];
    ``watch``/``subscribe(ordered_consumer=True)`` sends CONSUMER.CREATE.<s> (newer clients
    CONSUMER.CREATE.<s>.<name>.<filter>) and CONSUMER.INFO.<s>.<name>, and answers flow
    control on ``$JS.FC.<s>.>``. Never DELETE, PURGE, UPDATE, STEPDOWN, MSG.DELETE.
    """
    subjects: list[str] = ["$JS.API.INFO"]
    for s in streams:
        subjects += [
            f"$JS.API.STREAM.INFO.{s}",
            f"$JS.API.STREAM.MSG.GET.{s}",
            f"$JS.API.DIRECT.GET.{s}",
            f"$JS.API.DIRECT.GET.{s}.>",
            f"$JS.API.CONSUMER.CREATE.{s}",
            f"$JS.API.CONSUMER.CREATE.{s}.>",
            f"$JS.API.CONSUMER.INFO.{s}.*",
            f"$JS.FC.{s}.>",
        ]
    return tuple(subjects)


def agent_permissions(names: MeshNames, site: str, node: str) -> Permissions:
    """Exactly the keys and subjects of SPEC-v2 that carry this agent's own ``site.node``."""
    me = f"{_site(site)}.{_name('node', node, NODE_RE)}"
    publish: list[str] = []
    for bucket in names.lease_buckets:
        publish += [
            f"$KV.{bucket}.sess.{me}.live",
            f"$KV.{bucket}.sess.*.*.expired.{me}",
            f"$KV.{bucket}.lease.*.{me}",
            f"$KV.{bucket}.slot.*.{me}",
        ]
    publish += [
        f"$KV.{STATE_BUCKET}.agent.{me}",
        f"$KV.{STATE_BUCKET}.inst.*.{me}",
        # The holders' view: its keys name no agent, so any agent may write any entry. It
        # is display only (status reads the lease stores; nothing decides from it).
        f"$KV.{LEASE_VIEW_BUCKET}.app.>",
        f"harmony.events.{me}.>",
        f"harmony.instances.{me}",
        *read_api(names.kv_streams),
    ]
    subscribe = (
        f"harmony.cmd.{me}.*",
        "harmony.cmd.app.*.*",
        f"harmony.status.{me}",
        "harmony.instances.>",
        f"{agent_inbox_prefix(site, node)}.>",
    )
    return Permissions(tuple(publish), subscribe, allow_responses=True)


def operator_permissions(names: MeshNames, user: str) -> Permissions:
    publish = (
        f"$KV.{STATE_BUCKET}.app.*",
        f"$KV.{STATE_BUCKET}.drain.*",
        f"$KV.{STATE_BUCKET}.fence.*",
        "harmony.cmd.>",
        f"harmony.audit.{_user(user)}.>",
        "harmony.status.>",
        *read_api(names.streams),
    )
    return Permissions(publish, (f"{user_inbox_prefix(user)}.>",))


def viewer_permissions(names: MeshNames, user: str) -> Permissions:
    return Permissions(
        ("harmony.status.>", *read_api(names.streams)), (f"{user_inbox_prefix(user)}.>",)
    )


def trust_admin_permissions(user: str) -> Permissions:
    return Permissions(
        (f"$KV.{TRUST_BUCKET}.ca.*", *read_api([f"KV_{TRUST_BUCKET}"])),
        (f"{user_inbox_prefix(user)}.>",),
    )


def admin_permissions(user: str) -> Permissions:
    """The only JetStream administrator: creates buckets and streams, writes the descriptor
    and may repair any key (``agent forget``); it could delete whole streams anyway."""
    return Permissions(
        ("$JS.API.>", "$KV.>", "$JS.FC.>", "$JS.ACK.>"),
        (f"{user_inbox_prefix(user)}.>",),
    )


SYSTEM_INBOX = "_INBOX_sys"


def system_permissions() -> Permissions:
    """The embedded server's own agent in the system account: kick connections, nothing else."""
    return Permissions(("$SYS.REQ.SERVER.*.KICK",), (f"{SYSTEM_INBOX}.>",))


@dataclass(frozen=True)
class Roles:
    """Who may connect to one site's servers, by role (people by user name)."""

    site: str
    agents: tuple[str, ...] = ()
    """Nodes of *this* site whose agents connect here (certificate ``CN=<node>,OU=<site>``)."""
    guest_agents: tuple[tuple[str, str], ...] = ()
    """(site, node) of agents of *other* sites that connect here (a site without its own
    server); the client listener must then also trust those sites' CAs (from the signed
    bundle, so that revoking the site locks its agents out)."""
    operators: tuple[str, ...] = ()
    viewers: tuple[str, ...] = ()
    trust_admins: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()
    system_password: str | None = None
    """Password of the local system-account user (reachable only on the loopback websocket
    listener); None: no such user."""
    system_user: str = "harmony-system"
    extra_users: tuple[User, ...] = field(default=())

    def users(self, names: MeshNames) -> list[User]:
        users = [
            User(agent_identity(site, n), agent_permissions(names, site, n))
            for site, n in ((self.site, n) for n in self.agents)
        ]
        users += [
            User(agent_identity(site, n), agent_permissions(names, site, n))
            for site, n in self.guest_agents
        ]
        by_role = (
            (self.operators, lambda u: operator_permissions(names, u)),
            (self.viewers, lambda u: viewer_permissions(names, u)),
            (self.trust_admins, trust_admin_permissions),
            (self.admins, admin_permissions),
        )
        seen: set[str] = set()
        for people, perms in by_role:
            for user in people:
                if user in seen:
                    raise AuthzError(f"user {user!r}: one role per certificate identity")
                seen.add(user)
                users.append(User(person_identity(user), perms(user)))
        return [*users, *self.extra_users]


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(values: Sequence[str], indent: str) -> str:
    if not values:
        return "[]"
    inner = "".join(f"{indent}  {_q(v)}\n" for v in values)
    return f"[\n{inner}{indent}]"


def render_permissions(p: Permissions, indent: str = "") -> str:
    lines = [
        "{",
        f"{indent}  publish: {{ allow: {_list(p.publish, indent + '  ')} }}",
        f"{indent}  subscribe: {{ allow: {_list(p.subscribe, indent + '  ')} }}",
    ]
    if p.allow_responses:
        lines.append(f"{indent}  allow_responses: true")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def render_user(u: User, indent: str) -> str:
    parts = [f"{indent}{{", f"{indent}  user: {_q(u.name)}"]
    if u.password is not None:
        pw = u.password if u.password.startswith("$") else _q(u.password)
        parts.append(f"{indent}  password: {pw}")
    if u.connection_types:
        parts.append(
            f"{indent}  allowed_connection_types: [{', '.join(_q(c) for c in u.connection_types)}]"
        )
    if u.permissions is not None:
        parts.append(f"{indent}  permissions: {render_permissions(u.permissions, indent + '  ')}")
    parts.append(f"{indent}}}")
    return "\n".join(parts)


def render_accounts(names: MeshNames, roles: Roles) -> str:
    """The ``accounts`` + ``system_account`` block for one site's nats-servers."""
    users = roles.users(names)
    body = [
        "accounts {",
        f"  {ACCOUNT}: {{",
        "    jetstream: enabled",
        "    users: [",
        *(render_user(u, "      ") for u in users),
        "    ]",
        "  }",
        f"  {SYSTEM_ACCOUNT}: {{",
        "    users: [",
    ]
    if roles.system_password is not None:
        body.append(
            render_user(
                User(
                    roles.system_user,
                    system_permissions(),
                    password=roles.system_password,
                    connection_types=(WEBSOCKET,),
                ),
                "      ",
            )
        )
    body += ["    ]", "  }", "}", f"system_account: {SYSTEM_ACCOUNT}"]
    return "\n".join(body) + "\n"


EXAMPLE_COMMAND = (
    "harmony-agent ca accounts --site paris --stores paris,london,frankfurt --agents n1,n2 "
    "--operators ops-1 --viewers viewer-1 --trust-admins trust-admin-1 --admins admin-1"
)


def deploy_example() -> str:
    """``deploy/nats/accounts.conf``: site paris's accounts, as the command in its header
    prints them (a test keeps the file equal to this)."""
    header = f"""\
# harmony-agent: NATS accounts and per-identity permissions for site paris's nats-servers.
# Generated by mesh/authz.py; regenerate with:
#   {EXAMPLE_COMMAND}
# Render one file per site: a server lists only its own site's agents, and its client
# listener trusts only its own site's CA plus the operators' CA, so no other site's CA can
# mint an identity it accepts. Include it next to mutual TLS that maps certificates:
#   tls {{ cert_file: ..., key_file: ..., ca_file: <site CA + operators' CA>,
#         verify_and_map: true }}
#   include ./accounts.conf
# Users are certificate subjects (no passwords): agents CN=<node>,OU=<site>,O=harmony,
# people CN=<user>,OU=operators,O=harmony. Roles (docs/security.md):
#   agent        its own session/lease/slot keys in every lease store, its own heartbeat
#                and instance reports, its own events; read-only JetStream API on the
#                buckets (no create/update/delete/purge/step-down); replies to requests
#                it received; subscribes to its own command and status subjects, app
#                commands, instance gossip and its own inbox _INBOX_<site>_<node>.
#   operator     app.*, drain.*, fence.* in harmony-state; harmony.cmd.>; its own audit
#                subjects; reads everything; inbox _INBOX_user.<user>.
#   viewer       reads everything, writes nothing.
#   trust-admin  ca.* in harmony-trust (entries are also signed by the trust-admin key).
#   admin        the only JetStream administrator (buckets, streams, the descriptor, repairs).
# The SYS account has no user here: an embedded server adds its own agent's system user,
# reachable only on a loopback websocket listener, to disconnect evicted connections.
"""
    names = MeshNames(stores=("paris", "london", "frankfurt"))
    roles = Roles(
        site="paris",
        agents=("n1", "n2"),
        operators=("ops-1",),
        viewers=("viewer-1",),
        trust_admins=("trust-admin-1",),
        admins=("admin-1",),
    )
    return header + render_accounts(names, roles)
