"""One site's Kubernetes manifests, generated from a typed description (`harmony-agent manifests`).

Three namespaces, least privilege first:

- ``namespace`` (default ``harmony``): the agent DaemonSet and the workloads its Scores
  manage; Pod Security ``restricted``; the agent's Role covers only this namespace.
- ``system_namespace`` (default ``harmony-system``): this site's NATS StatefulSet, its
  config, the server certificate and the trust-bundle ConfigMap; workloads never run here.
- ``ca_namespace`` (default ``cert-manager``, cert-manager's cluster resource namespace):
  the site's root CA key, read only by cert-manager's ClusterIssuer.

Cross-site: every NATS pod of the site routes to every other pod of the site and to every
peer route URL; peers reach this site's pods through one Service per pod
(``nats-<i>.<external_domain>``, a LoadBalancer by default). Routes and clients are mTLS;
routes must present a certificate that names a configured route URL.

The description itself (``SiteSpec``, its validation and derived names) is in
``agent.deploy.site_spec``; this module only turns it into resources.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import yaml

from agent.config import NODE_HOSTNAME_ENV
from agent.deploy import k8s
from agent.deploy.budget import shutdown_budget
from agent.deploy.nats_conf import (
    ClusterBlock,
    Env,
    NatsServerConf,
    TlsBlock,
    User,
    admin_permissions,
    agent_permissions,
    inbox_prefix,
    operator_permissions,
    render,
    trust_admin_permissions,
    viewer_permissions,
)
from agent.deploy.reloader import SCRIPT as RELOADER
from agent.deploy.site_spec import (
    BUNDLE_CONFIGMAP,
    CLIENT_PORT,
    HEALTH_PORT,
    MONITOR_PORT,
    PART_OF,
    RESTRICTED,
    ROUTE_PORT,
    UID,
    Peer,
    SiteSpec,
    SpecError,
    agent_email,
    role_email,
)

__all__ = [
    "BUNDLE_CONFIGMAP",
    "Peer",
    "SiteSpec",
    "SpecError",
    "agent_email",
    "generate",
    "role_email",
    "to_yaml",
]


# --- the generator ------------------------------------------------------------------------


def generate(spec: SiteSpec) -> list[k8s.Resource]:
    spec.validate()
    return [
        *namespaces(spec),
        *certificate_authority(spec),
        *agent_rbac(spec),
        *agent_workload(spec),
        *nats(spec),
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (configs, scripts) as literal blocks, readable in the YAML."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(resources: Sequence[k8s.Resource], header: str = "") -> str:
    body = yaml.dump_all(
        [r.dump() for r in resources],
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=100,
    )
    return header + body


def _meta(name: str, namespace: str | None, **labels: str) -> k8s.ObjectMeta:
    return k8s.ObjectMeta(name=name, namespace=namespace, labels={**PART_OF, **labels})


def namespaces(spec: SiteSpec) -> list[k8s.Resource]:
    site = {"harmony.io/site": spec.site}
    return [
        k8s.Namespace(metadata=_meta(spec.namespace, None, **site, **RESTRICTED)),
        k8s.Namespace(metadata=_meta(spec.system_namespace, None, **site, **RESTRICTED)),
    ]


def _leaf(
    name: str,
    namespace: str,
    spec: SiteSpec,
    *,
    usages: list[str],
    dns_names: list[str] | None = None,
    email: str | None = None,
    common_name: str | None = None,
) -> k8s.Certificate:
    return k8s.Certificate(
        metadata=_meta(name, namespace),
        spec=k8s.CertificateSpec(
            secret_name=f"{name}-tls",
            issuer_ref=k8s.IssuerRef(name=spec.ca_issuer, kind="ClusterIssuer"),
            private_key=k8s.CertificatePrivateKey(rotation_policy="Always"),
            duration="2160h",
            renew_before="720h",
            common_name=common_name,
            subject=k8s.X509Subject(organizational_units=[spec.site]),
            usages=usages,
            dns_names=dns_names,
            email_addresses=[email] if email else None,
        ),
    )


def certificate_authority(spec: SiteSpec) -> list[k8s.Resource]:
    """The site's island of trust (ADR 017-1): self-signed root (OU = site), ClusterIssuer."""
    selfsigned = f"harmony-{spec.site}-selfsigned"
    return [
        k8s.Issuer(
            metadata=_meta(selfsigned, spec.ca_namespace),
            spec=k8s.IssuerSpec(self_signed={}),
        ),
        k8s.Certificate(
            metadata=_meta(spec.ca_issuer, spec.ca_namespace),
            spec=k8s.CertificateSpec(
                secret_name=spec.ca_issuer,
                issuer_ref=k8s.IssuerRef(name=selfsigned, kind="Issuer"),
                private_key=k8s.CertificatePrivateKey(),
                duration="87600h",
                is_ca=True,
                common_name=f"harmony {spec.site} root CA",
                subject=k8s.X509Subject(organizational_units=[spec.site]),
            ),
        ),
        k8s.ClusterIssuer(
            metadata=_meta(spec.ca_issuer, None),
            spec=k8s.IssuerSpec(ca=k8s.CaIssuerSpec(secret_name=spec.ca_issuer)),
        ),
    ]


def agent_rbac(spec: SiteSpec) -> list[k8s.Resource]:
    ns = spec.namespace
    manage = ["get", "list", "watch", "create", "patch", "update", "delete"]
    sa = k8s.Subject(name="harmony-agent", namespace=ns)
    return [
        k8s.ServiceAccount(metadata=_meta("harmony-agent", ns)),
        # Every kind a Score applies (server-side apply, field manager "harmony-agent") or
        # scales to stop (the scale subresource), and pods read for readiness.
        k8s.Role(
            metadata=_meta("harmony-agent", ns),
            rules=[
                k8s.PolicyRule(
                    api_groups=["apps"],
                    resources=["deployments", "statefulsets", "replicasets"],
                    verbs=manage,
                ),
                k8s.PolicyRule(
                    api_groups=["apps"],
                    resources=["deployments/scale", "statefulsets/scale", "replicasets/scale"],
                    verbs=["get", "patch", "update"],
                ),
                k8s.PolicyRule(api_groups=[""], resources=["services", "configmaps"], verbs=manage),
                k8s.PolicyRule(
                    api_groups=[""],
                    resources=["pods", "pods/status"],
                    verbs=["get", "list", "watch"],
                ),
            ],
        ),
        k8s.RoleBinding(
            metadata=_meta("harmony-agent", ns),
            subjects=[sa],
            role_ref=k8s.RoleRef(name="harmony-agent"),
        ),
        # The trust bundle: the agent writes every trusted site's CA into this one ConfigMap
        # of the system namespace (a merge patch of ca-bundle.pem), and nothing else there.
        k8s.Role(
            metadata=_meta("harmony-agent-trust-bundle", spec.system_namespace),
            rules=[
                k8s.PolicyRule(
                    api_groups=[""],
                    resources=["configmaps"],
                    resource_names=[BUNDLE_CONFIGMAP],
                    verbs=["get", "watch", "patch", "update"],
                )
            ],
        ),
        k8s.RoleBinding(
            metadata=_meta("harmony-agent-trust-bundle", spec.system_namespace),
            subjects=[sa],
            role_ref=k8s.RoleRef(name="harmony-agent-trust-bundle"),
        ),
    ]


def agent_config(spec: SiteSpec) -> str:
    servers = [f"tls://{spec.nats_pod_host(i)}:{CLIENT_PORT}" for i in range(spec.nats_replicas)]
    config = {
        "site": spec.site,
        "state_dir": "/var/lib/harmony-agent",
        "nats": {"servers": servers},
        # R3 streams put each replica on a different site (unique_tag "site:").
        "mesh": {
            "replicas": min(3, len(spec.stores)),
            "stores": list(spec.stores),
            "bootstrap": False,
        },
        "lease": {"ttl": spec.lease_ttl},
        "health": {"listen": f"0.0.0.0:{HEALTH_PORT}"},
        "topology": {"kind": "kubernetes", "in_cluster": True, "namespace": spec.namespace},
    }
    if spec.trust_admin_public_key:
        config["trust"] = {
            "bundle_file": "/var/lib/harmony-agent/trust/ca-bundle.pem",
            "admin_public_key": spec.trust_admin_public_key,
            "bundle_configmap": f"{spec.system_namespace}/{BUNDLE_CONFIGMAP}",
        }
    return (
        "# node: derived from $HARMONY_NODE_HOSTNAME (spec.nodeName), see docs/configuration.md\n"
        "# nats.tls: from HARMONY_AGENT_NATS__TLS__* (this node's own certificate)\n"
        + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=200)
    )


def agent_workload(spec: SiteSpec) -> list[k8s.Resource]:
    ns = spec.namespace
    labels = {"app.kubernetes.io/name": "harmony-agent", "harmony.io/site": spec.site}
    certs = [
        _leaf(
            f"harmony-agent-{node}",
            ns,
            spec,
            usages=["client auth"],
            email=agent_email(spec.site, node),
            common_name=f"{spec.site}/{node}",
        )
        for _, node in spec.agent_nodes
    ]
    # Every node's certificate is projected under its Kubernetes node name; each pod reads
    # its own through $(HARMONY_NODE_HOSTNAME) (a secret volume keeps receiving renewals,
    # which a subPath mount would not).
    tls_volume = k8s.Volume(
        name="tls",
        projected=k8s.ProjectedVolumeSource(
            default_mode=0o440,
            sources=[
                k8s.VolumeProjection(
                    secret=k8s.SecretProjection(
                        # Optional: one node's pending certificate must not block the others.
                        optional=True,
                        name=cert.spec.secret_name,
                        items=[
                            k8s.KeyToPath(key=key, path=f"{k8s_node}/{key}")
                            for key in ("ca.crt", "tls.crt", "tls.key")
                        ],
                    )
                )
                for (k8s_node, _), cert in zip(spec.agent_nodes, certs, strict=True)
            ],
        ),
    )
    tls_dir = "/etc/harmony-agent/tls/$(HARMONY_NODE_HOSTNAME)"
    container = k8s.Container(
        name="agent",
        image=spec.image,
        args=["run", "--config", "/etc/harmony-agent/agent.yaml"],
        env=[
            k8s.env_field(NODE_HOSTNAME_ENV, "spec.nodeName"),
            k8s.EnvVar(name="HARMONY_AGENT_NATS__TLS__CA_FILE", value=f"{tls_dir}/ca.crt"),
            k8s.EnvVar(name="HARMONY_AGENT_NATS__TLS__CERT_FILE", value=f"{tls_dir}/tls.crt"),
            k8s.EnvVar(name="HARMONY_AGENT_NATS__TLS__KEY_FILE", value=f"{tls_dir}/tls.key"),
        ],
        ports=[k8s.ContainerPort(name="health", container_port=HEALTH_PORT)],
        liveness_probe=k8s.Probe(
            http_get=k8s.HttpGet(path="/healthz", port="health"),
            period_seconds=10,
            failure_threshold=3,
        ),
        readiness_probe=k8s.Probe(
            http_get=k8s.HttpGet(path="/readyz", port="health"), period_seconds=5
        ),
        resources=k8s.ResourceRequirements(
            requests={"cpu": "20m", "memory": "96Mi"}, limits={"memory": "192Mi"}
        ),
        volume_mounts=[
            k8s.VolumeMount(
                name="config",
                mount_path="/etc/harmony-agent/agent.yaml",
                sub_path="agent.yaml",
                read_only=True,
            ),
            k8s.VolumeMount(name="tls", mount_path="/etc/harmony-agent/tls", read_only=True),
            k8s.VolumeMount(name="state", mount_path="/var/lib/harmony-agent"),
            k8s.VolumeMount(name="tmp", mount_path="/tmp"),
        ],
    )
    daemonset = k8s.DaemonSet(
        metadata=_meta("harmony-agent", ns, **labels),
        spec=k8s.DaemonSetSpec(
            selector=k8s.LabelSelector(match_labels={"app.kubernetes.io/name": "harmony-agent"}),
            update_strategy=k8s.DaemonSetUpdateStrategy(
                type="RollingUpdate",
                rolling_update=k8s.RollingUpdateDaemonSet(max_unavailable=1),
            ),
            template=k8s.PodTemplateSpec(
                metadata=k8s.TemplateMeta(labels=labels),
                spec=k8s.PodSpec(
                    service_account_name="harmony-agent",
                    # Shutdown budget (issue 9): max(stop_timeout) + 15 s.
                    termination_grace_period_seconds=shutdown_budget(spec.max_stop_timeout),
                    security_context=k8s.restricted_pod(UID),
                    containers=[container],
                    volumes=[
                        k8s.Volume(
                            name="config",
                            config_map=k8s.ConfigMapVolumeSource(name="harmony-agent"),
                        ),
                        tls_volume,
                        k8s.Volume(name="state", empty_dir=k8s.EmptyDirVolumeSource()),
                        k8s.Volume(name="tmp", empty_dir=k8s.EmptyDirVolumeSource()),
                    ],
                ),
            ),
        ),
    )
    config = k8s.ConfigMap(
        metadata=_meta("harmony-agent", ns), data={"agent.yaml": agent_config(spec)}
    )
    return [*certs, config, daemonset]


def nats_users(spec: SiteSpec) -> tuple[User, ...]:
    stores = spec.stores
    users = [
        User(agent_email(spec.site, node), agent_permissions(spec.site, node, stores))
        for _, node in spec.agent_nodes
    ]
    users += [
        User(role_email(spec.site, f"operator-{name}"), operator_permissions(name, stores))
        for name in spec.operators
    ]
    users += [
        User(role_email(spec.site, "viewer"), viewer_permissions(stores)),
        User(role_email(spec.site, "trust-admin"), trust_admin_permissions(stores)),
        User(role_email(spec.site, "admin"), admin_permissions()),
    ]
    return tuple(users)


def nats_config(spec: SiteSpec) -> NatsServerConf:
    server_tls = TlsBlock(
        cert_file="/etc/nats/tls/tls.crt",
        key_file="/etc/nats/tls/tls.key",
        ca_file="/etc/nats/run/ca.pem",
    )
    routes = [
        f"nats-route://{spec.nats_pod_host(i)}:{ROUTE_PORT}" for i in range(spec.nats_replicas)
    ] + [peer.url for peer in spec.peers]
    return NatsServerConf(
        server_name=Env("SERVER_NAME"),
        listen=f"0.0.0.0:{CLIENT_PORT}",
        monitor_listen=f"127.0.0.1:{MONITOR_PORT}",
        tags=(f"site:{spec.site}",),
        store_dir="/data/jetstream",
        pid_file="/etc/nats/run/nats.pid",
        tls=dataclasses.replace(server_tls, verify_and_map=True),
        cluster=ClusterBlock(
            name="harmony",
            listen=f"0.0.0.0:{ROUTE_PORT}",
            routes=tuple(routes),
            tls=dataclasses.replace(server_tls, verify=True, verify_cert_and_check_known_urls=True),
        )
        if spec.clustered
        else None,
        users=nats_users(spec),
        extra_comments=(
            f"harmony mesh node of site {spec.site} (generated by `harmony-agent manifests`)",
            f"lease stores of the mesh: {', '.join(spec.stores)}; agent inboxes: "
            f"{inbox_prefix(spec.site, '<node>')}.>",
        ),
    )


def nats(spec: SiteSpec) -> list[k8s.Resource]:
    ns = spec.system_namespace
    name = {"app.kubernetes.io/name": "nats"}
    labels = {**name, "harmony.io/site": spec.site}
    dns = [f"*.{spec.nats_service_host}", spec.nats_service_host, f"*.nats.{ns}.svc"]
    if spec.external_domain:
        dns += [spec.external_host(i) for i in range(spec.nats_replicas)]
    server_cert = _leaf(
        "nats-server", ns, spec, usages=["server auth", "client auth"], dns_names=dns,
        common_name=f"nats.{spec.site}",
    )  # fmt: skip
    admin_cert = _leaf(
        "harmony-admin", ns, spec, usages=["client auth"],
        email=role_email(spec.site, "admin"), common_name=f"{spec.site}/admin",
    )  # fmt: skip
    config = k8s.ConfigMap(
        metadata=_meta("nats-config", ns),
        data={"nats.conf": render(nats_config(spec)), "reloader.sh": RELOADER},
    )
    bundle = k8s.ConfigMap(
        metadata=k8s.ObjectMeta(
            name=BUNDLE_CONFIGMAP,
            namespace=ns,
            labels=PART_OF,
            annotations={
                "harmony.io/written-by": "harmony-agent",
                "harmony.io/description": "ca-bundle.pem: every trusted site's CA (harmony-"
                "trust); written by the agent, so it is created empty and never re-applied",
            },
        ),
    )
    mounts = [
        k8s.VolumeMount(name="config", mount_path="/etc/nats/config", read_only=True),
        k8s.VolumeMount(name="tls", mount_path="/etc/nats/tls", read_only=True),
        k8s.VolumeMount(name="bundle", mount_path="/etc/nats/bundle", read_only=True),
        k8s.VolumeMount(name="run", mount_path="/etc/nats/run"),
    ]
    healthz = [
        "python3",
        "-c",
        "import urllib.request; urllib.request.urlopen("
        f"'http://127.0.0.1:{MONITOR_PORT}/healthz?js-enabled-only=true', timeout=3)",
    ]
    image = spec.nats_image or spec.image
    nats_container = k8s.Container(
        name="nats",
        image=image,
        command=["nats-server", "-c", "/etc/nats/config/nats.conf"],
        env=[
            k8s.env_field("POD_NAME", "metadata.name"),
            # Server names are unique across the stretched cluster: prefix the site.
            k8s.EnvVar(name="SERVER_NAME", value=f"{spec.site}-$(POD_NAME)"),
        ],
        ports=[
            k8s.ContainerPort(name="client", container_port=CLIENT_PORT),
            k8s.ContainerPort(name="route", container_port=ROUTE_PORT),
        ],
        liveness_probe=k8s.Probe(
            tcp_socket=k8s.TcpSocket(port="client"), period_seconds=10, failure_threshold=6
        ),
        readiness_probe=k8s.Probe(
            exec=k8s.ExecAction(command=healthz), period_seconds=10, timeout_seconds=5
        ),
        resources=k8s.ResourceRequirements(
            requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "1Gi"}
        ),
        volume_mounts=[*mounts, k8s.VolumeMount(name="data", mount_path="/data")],
    )
    reload_cmd = ["sh", "/etc/nats/config/reloader.sh"]
    small = k8s.ResourceRequirements(
        requests={"cpu": "5m", "memory": "16Mi"}, limits={"memory": "32Mi"}
    )
    statefulset = k8s.StatefulSet(
        metadata=_meta("nats", ns, **labels),
        spec=k8s.StatefulSetSpec(
            service_name="nats",
            replicas=spec.nats_replicas,
            pod_management_policy="Parallel",
            selector=k8s.LabelSelector(match_labels=name),
            template=k8s.PodTemplateSpec(
                metadata=k8s.TemplateMeta(labels=labels),
                spec=k8s.PodSpec(
                    automount_service_account_token=False,
                    # The reloader signals nats-server through its pid file.
                    share_process_namespace=True,
                    termination_grace_period_seconds=60,
                    security_context=k8s.restricted_pod(UID),
                    affinity=k8s.Affinity(
                        pod_anti_affinity=k8s.PodAntiAffinity(
                            required_during_scheduling_ignored_during_execution=[
                                k8s.PodAffinityTerm(
                                    label_selector=k8s.LabelSelector(match_labels=name),
                                    topology_key="kubernetes.io/hostname",
                                )
                            ]
                        )
                    ),
                    init_containers=[
                        k8s.Container(
                            name="trust-init",
                            image=image,
                            command=[*reload_cmd, "--once"],
                            resources=small,
                            volume_mounts=mounts,
                        )
                    ],
                    containers=[
                        nats_container,
                        k8s.Container(
                            name="reloader",
                            image=image,
                            command=reload_cmd,
                            resources=small,
                            volume_mounts=mounts,
                        ),
                    ],
                    volumes=[
                        k8s.Volume(
                            name="config",
                            config_map=k8s.ConfigMapVolumeSource(name="nats-config"),
                        ),
                        k8s.Volume(
                            name="tls",
                            secret=k8s.SecretVolumeSource(
                                secret_name=server_cert.spec.secret_name, default_mode=0o440
                            ),
                        ),
                        k8s.Volume(
                            name="bundle",
                            config_map=k8s.ConfigMapVolumeSource(
                                name=BUNDLE_CONFIGMAP, optional=True
                            ),
                        ),
                        k8s.Volume(name="run", empty_dir=k8s.EmptyDirVolumeSource()),
                    ],
                ),
            ),
            volume_claim_templates=[
                k8s.PvcTemplate(
                    metadata=k8s.ObjectMeta(name="data"),
                    spec=k8s.PvcSpec(
                        access_modes=["ReadWriteOnce"],
                        resources=k8s.PvcResources(requests={"storage": spec.storage}),
                        storage_class_name=spec.storage_class,
                    ),
                )
            ],
        ),
    )
    ports = [
        k8s.ServicePort(name="client", port=CLIENT_PORT),
        k8s.ServicePort(name="route", port=ROUTE_PORT),
    ]
    headless = k8s.Service(
        metadata=_meta("nats", ns, **labels),
        spec=k8s.ServiceSpec(
            cluster_ip="None", publish_not_ready_addresses=True, selector=name, ports=ports
        ),
    )
    route_services = [
        k8s.Service(
            metadata=_meta(f"nats-{i}-route", ns, **labels),
            spec=k8s.ServiceSpec(
                type=spec.route_service_type,
                # Keep the peers' source addresses, which the NetworkPolicy's CIDRs match.
                external_traffic_policy=(
                    "Local" if spec.route_service_type != "ClusterIP" else None
                ),
                selector={"statefulset.kubernetes.io/pod-name": f"nats-{i}"},
                ports=[k8s.ServicePort(name="route", port=ROUTE_PORT, target_port="route")],
            ),
        )
        for i in range(spec.nats_replicas)
        if spec.peers
    ]
    pdb = k8s.PodDisruptionBudget(
        metadata=_meta("nats", ns),
        # One node at a time: the site's R3 streams keep a majority through a drain.
        spec=k8s.PodDisruptionBudgetSpec(
            selector=k8s.LabelSelector(match_labels=name), max_unavailable=1
        ),
    )
    clients = [
        k8s.NetworkPolicyPeer(
            namespace_selector=k8s.NamespaceSelector(
                match_labels={"kubernetes.io/metadata.name": spec.namespace}
            ),
            pod_selector=k8s.LabelSelector(
                match_labels={"app.kubernetes.io/name": "harmony-agent"}
            ),
        ),
        # Admin jobs (`harmony-agent mesh init`) run in the system namespace.
        k8s.NetworkPolicyPeer(pod_selector=k8s.LabelSelector(match_labels={})),
        *(k8s.NetworkPolicyPeer(ip_block=k8s.IpBlock(cidr=c)) for c in spec.client_cidrs),
    ]
    routes_from = [
        k8s.NetworkPolicyPeer(pod_selector=k8s.LabelSelector(match_labels=name)),
        *(k8s.NetworkPolicyPeer(ip_block=k8s.IpBlock(cidr=c)) for c in spec.peer_cidrs),
    ]
    policy = k8s.NetworkPolicy(
        metadata=_meta("nats", ns),
        # Monitoring (8222) listens on loopback only and gets no rule at all.
        spec=k8s.NetworkPolicySpec(
            pod_selector=k8s.LabelSelector(match_labels=name),
            policy_types=["Ingress"],
            ingress=[
                k8s.NetworkPolicyIngressRule(
                    ports=[k8s.NetworkPolicyPort(port=CLIENT_PORT)], from_=clients
                ),
                k8s.NetworkPolicyIngressRule(
                    ports=[k8s.NetworkPolicyPort(port=ROUTE_PORT)], from_=routes_from
                ),
            ],
        ),
    )
    return [
        server_cert,
        admin_cert,
        config,
        bundle,
        headless,
        *route_services,
        statefulset,
        pdb,
        policy,
    ]
