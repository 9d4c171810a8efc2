"""Typed Kubernetes and cert-manager objects: the subset the site manifests use.

Field names are Python's (snake_case); ``dump()`` gives the API's camelCase with unset
fields left out. ``extra="forbid"`` makes a misspelt field an error at generation time
instead of an object the API server rejects (or, worse, silently ignores).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class K8s(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ObjectMeta(K8s):
    name: str
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class Resource(K8s):
    api_version: str
    kind: str
    metadata: ObjectMeta

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- core/v1 ---------------------------------------------------------------------------


class Namespace(Resource):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Namespace"] = "Namespace"


class ServiceAccount(Resource):
    api_version: Literal["v1"] = "v1"
    kind: Literal["ServiceAccount"] = "ServiceAccount"
    automount_service_account_token: bool | None = None


class ConfigMap(Resource):
    api_version: Literal["v1"] = "v1"
    kind: Literal["ConfigMap"] = "ConfigMap"
    data: dict[str, str] | None = None


class ServicePort(K8s):
    name: str
    port: int
    target_port: int | str | None = None
    protocol: Literal["TCP", "UDP"] | None = None


class ServiceSpec(K8s):
    selector: dict[str, str]
    ports: list[ServicePort]
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = None
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    publish_not_ready_addresses: bool | None = None
    external_traffic_policy: Literal["Cluster", "Local"] | None = None


class Service(Resource):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Service"] = "Service"
    spec: ServiceSpec


class ObjectFieldSelector(K8s):
    field_path: str


class EnvVarSource(K8s):
    field_ref: ObjectFieldSelector


class EnvVar(K8s):
    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None


def env_field(name: str, path: str) -> EnvVar:
    return EnvVar(
        name=name, value_from=EnvVarSource(field_ref=ObjectFieldSelector(field_path=path))
    )


class ContainerPort(K8s):
    name: str
    container_port: int


class HttpGet(K8s):
    path: str
    port: int | str


class ExecAction(K8s):
    command: list[str]


class TcpSocket(K8s):
    port: int | str


class Probe(K8s):
    http_get: HttpGet | None = None
    exec: ExecAction | None = None
    tcp_socket: TcpSocket | None = None
    initial_delay_seconds: int | None = None
    period_seconds: int | None = None
    timeout_seconds: int | None = None
    failure_threshold: int | None = None


class Capabilities(K8s):
    drop: list[str]


class SeccompProfile(K8s):
    type: Literal["RuntimeDefault", "Localhost", "Unconfined"]


class ContainerSecurityContext(K8s):
    allow_privilege_escalation: bool
    read_only_root_filesystem: bool
    capabilities: Capabilities
    run_as_non_root: bool | None = None


RESTRICTED_CONTAINER = ContainerSecurityContext(
    allow_privilege_escalation=False,
    read_only_root_filesystem=True,
    capabilities=Capabilities(drop=["ALL"]),
)


class ResourceRequirements(K8s):
    requests: dict[str, str] | None = None
    limits: dict[str, str] | None = None


class VolumeMount(K8s):
    name: str
    mount_path: str
    read_only: bool | None = None
    sub_path: str | None = None


class Container(K8s):
    name: str
    image: str
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvVar] | None = None
    ports: list[ContainerPort] | None = None
    liveness_probe: Probe | None = None
    readiness_probe: Probe | None = None
    resources: ResourceRequirements | None = None
    security_context: ContainerSecurityContext = RESTRICTED_CONTAINER
    volume_mounts: list[VolumeMount] | None = None


class KeyToPath(K8s):
    key: str
    path: str


class ConfigMapVolumeSource(K8s):
    name: str
    optional: bool | None = None
    default_mode: int | None = None


class SecretVolumeSource(K8s):
    secret_name: str
    default_mode: int | None = None


class SecretProjection(K8s):
    name: str
    items: list[KeyToPath]
    optional: bool | None = None


class VolumeProjection(K8s):
    secret: SecretProjection


class ProjectedVolumeSource(K8s):
    sources: list[VolumeProjection]
    default_mode: int | None = None


class EmptyDirVolumeSource(K8s):
    medium: Literal["", "Memory"] | None = None
    size_limit: str | None = None


class Volume(K8s):
    name: str
    config_map: ConfigMapVolumeSource | None = None
    secret: SecretVolumeSource | None = None
    projected: ProjectedVolumeSource | None = None
    empty_dir: EmptyDirVolumeSource | None = None


class PodSecurityContext(K8s):
    run_as_non_root: bool
    run_as_user: int
    run_as_group: int
    fs_group: int
    seccomp_profile: SeccompProfile


def restricted_pod(uid: int) -> PodSecurityContext:
    """Pod Security Standard `restricted`: non-root, RuntimeDefault seccomp."""
    return PodSecurityContext(
        run_as_non_root=True,
        run_as_user=uid,
        run_as_group=uid,
        fs_group=uid,
        seccomp_profile=SeccompProfile(type="RuntimeDefault"),
    )


class LabelSelector(K8s):
    match_labels: dict[str, str]


class PodAffinityTerm(K8s):
    label_selector: LabelSelector
    topology_key: str


class PodAntiAffinity(K8s):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm]


class Affinity(K8s):
    pod_anti_affinity: PodAntiAffinity


class PodSpec(K8s):
    containers: list[Container]
    init_containers: list[Container] | None = None
    volumes: list[Volume] | None = None
    service_account_name: str | None = None
    automount_service_account_token: bool | None = None
    termination_grace_period_seconds: int | None = None
    share_process_namespace: bool | None = None
    security_context: PodSecurityContext | None = None
    affinity: Affinity | None = None
    node_selector: dict[str, str] | None = None
    priority_class_name: str | None = None


class TemplateMeta(K8s):
    labels: dict[str, str]
    annotations: dict[str, str] | None = None


class PodTemplateSpec(K8s):
    metadata: TemplateMeta
    spec: PodSpec


# --- apps/v1 ---------------------------------------------------------------------------


class RollingUpdateDaemonSet(K8s):
    max_unavailable: int | str


class DaemonSetUpdateStrategy(K8s):
    type: Literal["RollingUpdate", "OnDelete"]
    rolling_update: RollingUpdateDaemonSet | None = None


class DaemonSetSpec(K8s):
    selector: LabelSelector
    template: PodTemplateSpec
    update_strategy: DaemonSetUpdateStrategy | None = None


class DaemonSet(Resource):
    api_version: Literal["apps/v1"] = "apps/v1"
    kind: Literal["DaemonSet"] = "DaemonSet"
    spec: DaemonSetSpec


class PvcResources(K8s):
    requests: dict[str, str]


class PvcSpec(K8s):
    access_modes: list[str]
    resources: PvcResources
    storage_class_name: str | None = None


class PvcTemplate(K8s):
    metadata: ObjectMeta
    spec: PvcSpec


class StatefulSetSpec(K8s):
    service_name: str
    replicas: int
    selector: LabelSelector
    template: PodTemplateSpec
    pod_management_policy: Literal["OrderedReady", "Parallel"] | None = None
    volume_claim_templates: list[PvcTemplate] | None = None


class StatefulSet(Resource):
    api_version: Literal["apps/v1"] = "apps/v1"
    kind: Literal["StatefulSet"] = "StatefulSet"
    spec: StatefulSetSpec


# --- policy/v1, networking.k8s.io/v1, rbac.authorization.k8s.io/v1 ---------------------


class PodDisruptionBudgetSpec(K8s):
    selector: LabelSelector
    max_unavailable: int | None = None
    min_available: int | None = None


class PodDisruptionBudget(Resource):
    api_version: Literal["policy/v1"] = "policy/v1"
    kind: Literal["PodDisruptionBudget"] = "PodDisruptionBudget"
    spec: PodDisruptionBudgetSpec


class IpBlock(K8s):
    cidr: str


class NamespaceSelector(K8s):
    match_labels: dict[str, str]


class NetworkPolicyPeer(K8s):
    pod_selector: LabelSelector | None = None
    namespace_selector: NamespaceSelector | None = None
    ip_block: IpBlock | None = None


class NetworkPolicyPort(K8s):
    port: int
    protocol: Literal["TCP"] = "TCP"


class NetworkPolicyIngressRule(K8s):
    ports: list[NetworkPolicyPort]
    from_: list[NetworkPolicyPeer] = Field(alias="from")


class NetworkPolicySpec(K8s):
    pod_selector: LabelSelector
    policy_types: list[Literal["Ingress", "Egress"]]
    ingress: list[NetworkPolicyIngressRule]


class NetworkPolicy(Resource):
    api_version: Literal["networking.k8s.io/v1"] = "networking.k8s.io/v1"
    kind: Literal["NetworkPolicy"] = "NetworkPolicy"
    spec: NetworkPolicySpec


class PolicyRule(K8s):
    api_groups: list[str]
    resources: list[str]
    verbs: list[str]
    resource_names: list[str] | None = None


class Role(Resource):
    api_version: Literal["rbac.authorization.k8s.io/v1"] = "rbac.authorization.k8s.io/v1"
    kind: Literal["Role"] = "Role"
    rules: list[PolicyRule]


class Subject(K8s):
    kind: Literal["ServiceAccount"] = "ServiceAccount"
    name: str
    namespace: str


class RoleRef(K8s):
    api_group: Literal["rbac.authorization.k8s.io"] = "rbac.authorization.k8s.io"
    kind: Literal["Role"] = "Role"
    name: str


class RoleBinding(Resource):
    api_version: Literal["rbac.authorization.k8s.io/v1"] = "rbac.authorization.k8s.io/v1"
    kind: Literal["RoleBinding"] = "RoleBinding"
    subjects: list[Subject]
    role_ref: RoleRef


# --- cert-manager.io/v1 ----------------------------------------------------------------


class CaIssuerSpec(K8s):
    secret_name: str


class IssuerSpec(K8s):
    self_signed: dict[str, str] | None = None
    ca: CaIssuerSpec | None = None


class Issuer(Resource):
    api_version: Literal["cert-manager.io/v1"] = "cert-manager.io/v1"
    kind: Literal["Issuer"] = "Issuer"
    spec: IssuerSpec


class ClusterIssuer(Resource):
    api_version: Literal["cert-manager.io/v1"] = "cert-manager.io/v1"
    kind: Literal["ClusterIssuer"] = "ClusterIssuer"
    spec: IssuerSpec


class IssuerRef(K8s):
    name: str
    kind: Literal["Issuer", "ClusterIssuer"]
    group: Literal["cert-manager.io"] = "cert-manager.io"


class CertificatePrivateKey(K8s):
    algorithm: Literal["ECDSA"] = "ECDSA"
    size: Literal[256] = 256
    rotation_policy: Literal["Always", "Never"] | None = None


class X509Subject(K8s):
    organizational_units: list[str]


class CertificateSpec(K8s):
    secret_name: str
    issuer_ref: IssuerRef
    private_key: CertificatePrivateKey
    duration: str
    is_ca: bool | None = Field(default=None, alias="isCA")
    renew_before: str | None = None
    common_name: str | None = None
    subject: X509Subject | None = None
    usages: list[str] | None = None
    dns_names: list[str] | None = None
    email_addresses: list[str] | None = None


class Certificate(Resource):
    api_version: Literal["cert-manager.io/v1"] = "cert-manager.io/v1"
    kind: Literal["Certificate"] = "Certificate"
    spec: CertificateSpec
