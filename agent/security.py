"""The agent's side of issues 11 and 12, in the few calls the daemon makes.

- ``connection_options(config)``: TLS files, creds or user + password file, the agent's
  private inbox prefix.
- ``embedded_spec(config, system_password)``: the embedded nats-server with mTLS on client
  and route listeners, this site's accounts (``mesh.authz``) and the loopback system user.
- ``SiteSecurity``: the ``trust-sync`` task (signed entries -> bundle file, and in
  Kubernetes the bundle ConfigMap), eviction after a CA leaves the bundle (reload without
  its routes, kick its clients), the ``cert-renew`` task (leaves renewed before 2/3 of
  their life when the site CA key is here), the ``harmony_cert_expiry_seconds{cert}`` gauge
  and a ``security`` status section.
- ``RedactingEventPublisher``: the controller's events, with every field redacted.

``agent.daemon`` (the composition root) makes these calls in its written order. Nothing here
ever logs or returns a secret (see ``mesh.redact``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats
import structlog
from cryptography import x509
from nats.js.kv import KeyValue
from prometheus_client import Gauge

from agent.config import AgentConfig
from agent.controller.events import EventPublisher
from agent.trust_sync import BundleChange, TrustSync, admin_key_or_none, read_bundle
from mesh.authz import SYSTEM_INBOX, MeshNames, Roles, agent_inbox_prefix, render_accounts
from mesh.connection import ConnectionOptions, MeshConnection, TlsFiles
from mesh.embedded import EmbeddedServer, ServerSpec, ServerTls
from mesh.evict import (
    RouteMap,
    connections,
    kick,
    monitor,
    spki_sha256,
    to_kick,
    wait_reloaded,
)
from mesh.redact import redact, redact_value, register
from mesh.rotation import (
    expiry_seconds,
    expiry_warnings,
    leaf_of,
    renew_leaf,
    renew_time,
    renewal_due,
)
from mesh.trust import SiteCA, TrustError, TrustState, fingerprint, write_atomically
from topologies.capabilities import KubernetesApi

log = structlog.get_logger("agent.security")

CERT_EXPIRY = Gauge(
    "harmony_cert_expiry_seconds",
    "Seconds until the earliest notAfter among the certificates in each file in use",
    ["cert"],
)
SYSTEM_USER = "harmony-system"
BUNDLE_KEY = "ca-bundle.pem"
"""The bundle ConfigMap's key (``agent.deploy.reloader`` reads it)."""
MAX_RENEW_SLEEP = 30.0
"""Also how soon a leaf renewed by someone else (root's timer) is put to use."""
MIN_RENEW_SLEEP = 0.2
RETRY_CONFIGMAP = 2.0


class RedactingEventPublisher(EventPublisher):
    """Events go to a stream viewers read: no field may carry a secret (an error's repr
    with a URL password, a registered password)."""

    async def publish(self, event: str, app: str, token: int | None, **fields: Any) -> None:
        await super().publish(event, app, token, **redact_value(fields))


def system_password() -> str:
    """A fresh password for the local system-account user, registered for redaction."""
    return register(secrets.token_urlsafe(32))


def connection_options(config: AgentConfig) -> ConnectionOptions:
    n = config.nats
    tls = n.tls
    return ConnectionOptions(
        servers=tuple(n.servers),
        name=f"harmony-agent {config.agent_id}",
        tls=TlsFiles(tls.ca_file, tls.cert_file, tls.key_file) if tls else None,
        credentials=n.credentials,
        user=n.user,
        password_file=n.password_file,
        inbox_prefix=agent_inbox_prefix(config.site, config.node),
        connect_timeout=n.connect_timeout,
        # Detect a dead server well within one ttl so the client fails over in time.
        ping_interval=max(1.0, config.lease.ttl / 3),
    )


def guest_agents(config: AgentConfig) -> list[tuple[str, str]]:
    """Agents of other sites that connect to this site's server (``<site>/<node>``)."""
    out = []
    for entry in config.nats.accounts.agents if config.nats.accounts else []:
        site, _, node = entry.rpartition("/")
        if site and site != config.site:
            out.append((site, node))
    return out


def local_agents(config: AgentConfig) -> list[str]:
    nodes = [config.node]
    for entry in config.nats.accounts.agents if config.nats.accounts else []:
        site, _, node = entry.rpartition("/")
        if not site or site == config.site:
            nodes.append(node)
    return list(dict.fromkeys(nodes))


def trust_state_path(config: AgentConfig) -> Path:
    return config.state_dir / "trust-state.json"


def client_ca_path(config: AgentConfig) -> Path:
    return config.state_dir / "nats" / "client-ca.pem"


def write_client_ca(config: AgentConfig, trusted: Mapping[str, str]) -> tuple[Path, bool]:
    """The client listener's CAs: the configured ones (this site, operators) plus, for each
    guest agent's site, that site's CA *as the signed bundle has it now* (keyed by the KV
    key): revoking the site drops it here too."""
    st = config.nats.server_tls
    assert st is not None
    pems = st.client_ca_file.read_bytes()
    for site in sorted({site for site, _ in guest_agents(config)}):
        if site in trusted:
            pems += trusted[site].encode()
    path = client_ca_path(config)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path, write_atomically(path, pems)


def _persisted_trust(config: AgentConfig) -> dict[str, str]:
    try:
        return TrustState.load(trust_state_path(config)).trusted()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}


def embedded_spec(config: AgentConfig, system_password: str | None = None) -> ServerSpec:
    """The embedded server's spec; with guest agents, (re)writes their client CA file."""
    n = config.nats
    server_tls = None
    if n.server_tls is not None:
        st = n.server_tls
        client_ca = st.client_ca_file
        if guest_agents(config):
            client_ca, _ = write_client_ca(config, _persisted_trust(config))
        server_tls = ServerTls(
            cert_file=st.cert_file,
            key_file=st.key_file,
            client_ca_file=client_ca,
            route_ca_file=st.route_ca_file or config.trust.bundle_file or st.client_ca_file,
        )
    accounts = ""
    system_listen = None
    if n.accounts is not None:
        a = n.accounts
        with_password = system_password if n.system_listen else None
        stores = a.stores or config.mesh.stores or [config.site]
        accounts = render_accounts(
            MeshNames(stores=tuple(stores)),
            Roles(
                site=config.site,
                agents=tuple(local_agents(config)),
                guest_agents=tuple(guest_agents(config)),
                operators=tuple(a.operators),
                viewers=tuple(a.viewers),
                trust_admins=tuple(a.trust_admins),
                admins=tuple(a.admins),
                system_password=with_password,
                system_user=SYSTEM_USER,
            ),
        )
        system_listen = n.system_listen if with_password else None
    return ServerSpec(
        name=f"{config.site}-{config.node}",
        store_dir=config.state_dir / "nats" / "jetstream",
        listen=n.listen,
        monitor_listen=n.monitor_listen or None,
        cluster_name=n.cluster_name,
        cluster_listen=n.cluster_listen,
        routes=tuple(n.routes),
        tags=(f"site:{config.site}",),
        server_tls=server_tls,
        accounts=accounts,
        system_listen=system_listen,
        insecure=n.insecure,
    )


def _monitor_base(listen: str | None) -> str | None:
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


class SiteSecurity:
    """Trust sync, eviction, renewal and certificate facts for one agent."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        connection: MeshConnection | None = None,
        embedded: EmbeddedServer | None = None,
        system_password: str | None = None,
    ) -> None:
        self.config = config
        self.connection = connection
        self.embedded = embedded
        self.system_password = system_password
        self.routes = RouteMap()
        self.sync: TrustSync | None = None
        self.evictions: list[dict[str, Any]] = []
        self.renewals: list[dict[str, Any]] = []
        self.renew_problem: str | None = None
        self.expiries: dict[str, float] = {}
        self._digests: dict[str, str] = {}
        self.kube: KubernetesApi | None = None
        """The Kubernetes topology's API, where the bundle ConfigMap is written."""
        self.configmap_problem: str | None = None
        self._configmap_pending = False
        self._configmap_written: str | None = None
        self._wake = asyncio.Event()
        """Wakes the renewer early (a ConfigMap write to retry)."""

    # --- trust ---------------------------------------------------------------------------

    def own_ca(self) -> x509.Certificate | None:
        path = self.config.trust.site_ca_file
        if path is None:
            return None
        try:
            return x509.load_pem_x509_certificates(path.read_bytes())[0]
        except (OSError, ValueError, IndexError):
            return None

    def trust_sync(self, kv: KeyValue) -> TrustSync:
        """The task to supervise as ``trust-sync`` (``await sync.run()``)."""
        cfg = self.config
        if cfg.trust.bundle_file is None:
            raise ValueError("trust.bundle_file is not set")
        n = cfg.nats
        if (
            n.embedded
            and n.server_tls is not None
            and n.server_tls.route_ca_file not in (None, cfg.trust.bundle_file)
        ):
            log.warning(
                "route_ca_not_bundle",
                msg="the embedded server's route CA file is not trust.bundle_file: "
                "revocations will not reach its routes",
                route_ca_file=str(n.server_tls.route_ca_file),
                bundle_file=str(cfg.trust.bundle_file),
            )
        self.sync = TrustSync(
            kv,
            cfg.trust.bundle_file,
            admin_key_or_none(cfg.trust.admin_public_key),
            own_site=cfg.site,
            own_ca=self.own_ca(),
            state_path=trust_state_path(cfg),
            on_change=self.on_bundle_change,
            on_synced=self.on_synced,
        )
        return self.sync

    async def run_trust_sync(self, kv: KeyValue) -> None:
        """The ``trust-sync`` supervised task: learn whose routes are whose, then sync for
        ever (it never ends by itself; a bad entry is counted, never raised)."""
        sync = self.trust_sync(kv)
        with contextlib.suppress(OSError, ValueError):
            await self.learn_routes()
        await sync.run()

    async def publish_bundle(self) -> bool:
        """Write the bundle file's content into ``trust.bundle_configmap`` (a merge patch of
        its one key; the agent's Role allows exactly that ConfigMap). A failure is kept in
        the status and retried by the ``cert-renew`` task; True when written."""
        target, bundle = self.config.trust.bundle_configmap, self.config.trust.bundle_file
        if target is None or self.kube is None or bundle is None:
            return False
        namespace, _, name = target.partition("/")
        try:
            pem = bundle.read_text()
            if pem == self._configmap_written:
                return True
            await self.kube.patch(
                "v1", "ConfigMap", name, {"data": {BUNDLE_KEY: pem}}, namespace=namespace
            )
        except Exception as exc:  # the API server down, RBAC: report, retry, never crash
            self.configmap_problem = redact(f"{target}: {exc}")
            self._configmap_pending = True
            self._wake.set()
            log.warning(
                "bundle_configmap_failed",
                msg=f"trust bundle ConfigMap not written: {self.configmap_problem}",
                error=self.configmap_problem,
            )
            return False
        self.configmap_problem = None
        self._configmap_pending = False
        self._configmap_written = pem
        log.info(
            "bundle_configmap_written", msg=f"trust bundle written to {target}", configmap=target
        )
        return True

    async def on_synced(self) -> None:
        """After the first sync: the ConfigMap (created empty by the manifests), and guest
        sites' CAs as the signed bundle has them now."""
        await self.publish_bundle()
        if self.embedded is not None and guest_agents(self.config) and self.sync is not None:
            _, changed = write_client_ca(self.config, self.sync.state.trusted())
            if changed:
                self.embedded.reload()

    async def learn_routes(self) -> None:
        """Remember which CA issued each configured route's certificate (call once the
        server runs; eviction probes again and falls back on what was learned here)."""
        if self.embedded is not None and self.embedded.spec.routes:
            await self.routes.refresh(self.embedded.spec.routes)

    async def on_bundle_change(self, change: BundleChange) -> None:
        await self.publish_bundle()
        if self.embedded is None:
            return  # an external server: its reloader or operator reloads it (docs/trust.md)
        if guest_agents(self.config) and self.sync is not None:
            write_client_ca(self.config, self.sync.state.trusted())
        await self.evict(change)

    async def evict(self, change: BundleChange) -> dict[str, Any]:
        """Reload the embedded server with the routes whose servers' CAs are still trusted
        (every configured route whose certificate we never saw stays: its handshake is
        checked against the new bundle anyway), then kick every client connection the
        evicted CAs authenticated. Returns (and keeps) a report."""
        assert self.embedded is not None
        spec = self.embedded.spec
        started = time.monotonic()
        configured = tuple(self.config.nats.routes)
        if configured:
            await self.routes.refresh(configured)
        trusted = list(change.trusted)
        keep = tuple(
            r
            for r in configured
            if r not in self.routes.certs or self.routes.issued_by_any(r, trusted)
        )
        removed = [r for r in spec.routes if r not in keep]
        restored = [r for r in keep if r not in spec.routes]
        base = _monitor_base(spec.monitor_listen)
        new_spec = dataclasses.replace(spec, routes=keep, route_pins=())
        reloaded = True
        if change.evicted and spec.server_tls is not None:
            # Pin the routes to the peers we keep for one reload: nats-server then closes
            # every other route, whichever side dialled it.
            pins = tuple(
                sorted({spki_sha256(self.routes.certs[r]) for r in keep if r in self.routes.certs})
            )
            reloaded = await self._reload(base, dataclasses.replace(new_spec, route_pins=pins))
        reloaded = await self._reload(base, new_spec) and reloaded
        kicked = 0
        if change.evicted and reloaded and base is not None:
            kicked = await self._kick(base, change)
        report = {
            "evicted": [fingerprint(c) for c in change.evicted],
            "routes_removed": removed,
            "routes_restored": restored,
            "reloaded": reloaded,
            "clients_kicked": kicked,
            "seconds": round(time.monotonic() - started, 3),
        }
        self.evictions.append(report)
        del self.evictions[:-10]
        log.info("bundle_change_applied", msg=f"bundle change applied: {report}", **report)
        return report

    async def _reload(self, base: str | None, spec: ServerSpec) -> bool:
        """Reload with ``spec``; wait until the server says it loaded a new config."""
        assert self.embedded is not None
        before = None
        if base is not None:
            with contextlib.suppress(OSError, ValueError):
                before = (await monitor(base, "varz")).get("config_load_time")
        if not self.embedded.reload(spec):
            return False
        return base is None or await wait_reloaded(base, before)

    async def _kick(self, base: str, change: BundleChange) -> int:
        if self.system_password is None or self.embedded is None:
            log.warning(
                "evict_no_system_user",
                msg="no system user: evicted clients stay until they reconnect",
            )
            return 0
        trusted = list(change.trusted)
        if self.embedded.spec.server_tls is not None:
            trusted += read_bundle(self.embedded.spec.server_tls.client_ca_file)
        conns = await connections(base)
        cids = to_kick(conns, change.evicted, trusted)
        if not cids:
            return 0
        server_id = str((await monitor(base, "varz")).get("server_id"))
        system = await nats.connect(
            servers=[f"ws://{self.embedded.spec.system_listen}"],
            user=SYSTEM_USER,
            password=self.system_password,
            inbox_prefix=SYSTEM_INBOX,
            name="harmony-agent system",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )
        try:
            return await kick(system, server_id, cids)
        finally:
            await system.close()

    # --- certificates --------------------------------------------------------------------

    def certificate_files(self) -> dict[str, Path]:
        cfg = self.config
        files: dict[str, Path] = {}
        if cfg.nats.tls is not None:
            if cfg.nats.tls.cert_file is not None:
                files["agent"] = cfg.nats.tls.cert_file
            if cfg.nats.tls.ca_file is not None:
                files["agent-ca"] = cfg.nats.tls.ca_file
        if cfg.nats.embedded and cfg.nats.server_tls is not None:
            files["server"] = cfg.nats.server_tls.cert_file
            files["client-ca"] = cfg.nats.server_tls.client_ca_file
        if cfg.trust.site_ca_file is not None:
            files["site-ca"] = cfg.trust.site_ca_file
        if cfg.trust.bundle_file is not None:
            files["bundle"] = cfg.trust.bundle_file
        return files

    def update_expiry(self) -> dict[str, float]:
        self.expiries = expiry_seconds(self.certificate_files())
        for name, seconds in self.expiries.items():
            CERT_EXPIRY.labels(cert=name).set(seconds)
        return self.expiries

    def warnings(self) -> list[str]:
        """Certificates in use that expire within 30 days (for ``status``)."""
        return expiry_warnings(self.update_expiry())

    def last_warnings(self) -> list[str]:
        """``warnings()`` as of the renewer's last look (at most 30 s old): the agent's
        summary asks every second and need not re-read the files."""
        return expiry_warnings(self.expiries)

    def _leaves(self) -> list[tuple[str, Path, Path]]:
        cfg = self.config
        leaves: list[tuple[str, Path, Path]] = []
        tls = cfg.nats.tls
        if tls is not None and tls.cert_file is not None and tls.key_file is not None:
            leaves.append(("agent", tls.cert_file, tls.key_file))
        st = cfg.nats.server_tls
        if cfg.nats.embedded and st is not None and st.cert_file not in [p for _, p, _ in leaves]:
            leaves.append(("server", st.cert_file, st.key_file))
        return leaves

    def _site_ca(self) -> SiteCA | None:
        ca_dir = self.config.trust.ca_dir
        if ca_dir is None:
            self.renew_problem = "trust.ca_dir is not set: leaves are renewed elsewhere"
            return None
        try:
            ca = SiteCA.load(ca_dir)
        except TrustError as exc:
            self.renew_problem = str(exc)
            return None
        if ca.site != self.config.site:
            self.renew_problem = f"{ca_dir} holds the CA of {ca.site!r}, not {self.config.site!r}"
            return None
        self.renew_problem = None
        return ca

    def renew_once(self, now: datetime.datetime | None = None) -> list[str]:
        """Renew every leaf past 2/3 of its life; reload/refresh what uses it."""
        due = []
        for name, cert, key in self._leaves():
            try:
                if renewal_due(leaf_of(cert), now):
                    due.append((name, cert, key))
            except (OSError, ValueError, IndexError) as exc:
                self.renew_problem = f"{name}: {cert}: {exc!r}"
        renewed: list[str] = []
        if due:
            ca = self._site_ca()
            for name, cert, key in due if ca is not None else ():
                assert ca is not None
                try:
                    new = renew_leaf(ca, cert, key)
                except (OSError, ValueError, TrustError) as exc:
                    self.renew_problem = f"renewing {name}: {exc!r}"
                    continue
                renewed.append(name)
                self.renewals.append(
                    {"cert": name, "serial": format(new.serial_number, "x"), "at": time.time()}
                )
                del self.renewals[:-10]
                serial = format(new.serial_number, "x")
                log.info(
                    "certificate_renewed",
                    msg=f"{name} certificate renewed ({serial})",
                    cert=name,
                    serial=serial,
                )
        # Renewed here or by root's `harmony-agent ca renew` (a timer, when the agent may not
        # read the CA key): whatever changed on disk is put to use.
        changed = self._changed_leaves()
        if "server" in changed and self.embedded is not None:
            self.embedded.reload()
        if "agent" in changed and self.connection is not None:
            self.connection.refresh_tls()
        self.update_expiry()
        return renewed

    def _changed_leaves(self) -> set[str]:
        changed = set()
        for name, cert, key in self._leaves():
            try:
                digest = hashlib.sha256(cert.read_bytes() + key.read_bytes()).hexdigest()
            except OSError:
                continue
            if self._digests.get(name) not in (None, digest):
                changed.add(name)
            self._digests[name] = digest
        return changed

    def next_renewal(self) -> float:
        """Seconds until the earliest leaf is due (clamped)."""
        now = datetime.datetime.now(datetime.UTC)
        waits = []
        for _, cert, _ in self._leaves():
            with contextlib.suppress(OSError, ValueError, IndexError):
                waits.append((renew_time(leaf_of(cert)) - now).total_seconds())
        wait = min(waits) if waits else MAX_RENEW_SLEEP
        return min(MAX_RENEW_SLEEP, max(MIN_RENEW_SLEEP, wait))

    async def renew_forever(self) -> None:
        """The ``cert-renew`` task: renew when due, update the expiry gauge, retry a bundle
        ConfigMap write that failed (every 2 s until it works); never exit."""
        while True:
            if self._configmap_pending:
                await self.publish_bundle()
            try:
                self.renew_once()
            except Exception as exc:  # never take the agent down over a renewal
                self.renew_problem = redact(repr(exc))
                log.error(
                    "certificate_renewal_failed",
                    msg=f"certificate renewal failed: {self.renew_problem}",
                    error=self.renew_problem,
                )
            delay = self.next_renewal()
            if self._configmap_pending:
                delay = min(delay, RETRY_CONFIGMAP)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    # --- status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``security`` section of the live status (no secret in it)."""
        return {
            "security": {
                "trust": self.sync.status() if self.sync is not None else None,
                "certificates": {k: round(v) for k, v in self.update_expiry().items()},
                "warnings": expiry_warnings(self.expiries),
                "renewal_problem": self.renew_problem,
                "renewals": list(self.renewals),
                "evictions": list(self.evictions),
                "bundle_configmap": self.config.trust.bundle_configmap,
                "bundle_configmap_problem": self.configmap_problem,
            }
        }
