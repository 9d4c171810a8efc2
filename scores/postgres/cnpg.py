"""``kind: CloudNativePG``: the same roles on Kubernetes, with CloudNativePG's distributed
topology.

One CloudNativePG ``Cluster`` per site (``<name>-<site>``), each listing every site's cluster
in ``externalClusters``. ``spec.replica.primary`` names the primary cluster of the whole
topology and ``spec.replica.source`` the cluster a replica streams from; a cluster whose
``primary`` is not itself is a replica cluster. A controlled switchover is CloudNativePG's:
the old primary is demoted (``primary`` set to the new one), publishes
``status.demotionToken``, and the new primary is promoted with that token as
``spec.replica.promotionToken``, which makes it wait until it has replayed everything the old
one wrote. Without a token (the old site is gone) the promotion is immediate.

CloudNativePG does not fence by a lease deadline: ``enforces_deadline`` is False, so under
AbsoluteConsistency the agent must demote (or stop) a primary itself before its lease ends.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from scores.base import Observation, Outcome, RunContext, Score, WorkloadState
from scores.k8s import DNS_LABEL, FIELD_MANAGER
from scores.postgres.spec import OWNED_PARAMETERS
from scores.roles import PrimaryInfo, ReplicatedInterpret, ReplicationStatus, Role
from topologies.capabilities import KubernetesApi
from topologies.higher_order import Provides, resolve

API_VERSION = "postgresql.cnpg.io/v1"
HIBERNATION = "cnpg.io/hibernation"
TOKEN_ANNOTATION = "harmony/fencing-token"


# ------------------------------------------------------------------ typed manifest
class _M(BaseModel):
    """A CRD object: camelCase on the wire, unknown fields refused when built."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)


class SecretKeySelector(_M):
    name: str
    key: str


class ExternalCluster(_M):
    name: str
    connection_parameters: dict[str, str]
    ssl_cert: SecretKeySelector | None = None
    ssl_key: SecretKeySelector | None = None
    ssl_root_cert: SecretKeySelector | None = None


class ReplicaConfig(_M):
    self_: str = Field(alias="self")
    primary: str
    source: str
    promotion_token: str | None = None


class InitDb(_M):
    database: str = "app"
    owner: str = "app"
    data_checksums: bool = True


class PgBaseBackup(_M):
    source: str


class Bootstrap(_M):
    initdb: InitDb | None = None
    pg_basebackup: PgBaseBackup | None = Field(default=None, alias="pg_basebackup")


class Storage(_M):
    size: str
    storage_class: str | None = None


class Synchronous(_M):
    method: Literal["any", "first"] = "any"
    number: int = 1
    data_durability: Literal["required", "preferred"] = "required"


class PostgresConfig(_M):
    parameters: dict[str, str] = Field(default_factory=dict)
    synchronous: Synchronous | None = None


class ClusterSpec(_M):
    instances: int
    image_name: str | None = None
    storage: Storage
    bootstrap: Bootstrap
    external_clusters: list[ExternalCluster]
    replica: ReplicaConfig
    postgresql: PostgresConfig | None = None


class ObjectMeta(_M):
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Cluster(_M):
    api_version: Literal["postgresql.cnpg.io/v1"] = "postgresql.cnpg.io/v1"
    kind: Literal["Cluster"] = "Cluster"
    metadata: ObjectMeta
    spec: ClusterSpec

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        return data


# ------------------------------------------------------------------ the Score
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudNativePGSite(_Strict):
    host: str = Field(min_length=1)
    """Address other sites' clusters reach this site's primary at (its ``-rw`` service,
    exposed across clusters)."""
    port: int = Field(default=5432, ge=1, le=65535)


class CloudNativePGSpec(Score):
    """One CloudNativePG ``Cluster`` per site; the lease holder's is the primary cluster."""

    kind: Literal["CloudNativePG"] = "CloudNativePG"
    name: str = Field(pattern=DNS_LABEL, max_length=40)
    namespace: str | None = Field(default=None, pattern=DNS_LABEL, max_length=63)
    sites: dict[str, CloudNativePGSite] = Field(min_length=2)
    instances: int = Field(default=3, ge=1)
    storage_size: str = "10Gi"
    storage_class: str | None = None
    image_name: str | None = None
    synchronous: bool = False
    """Inside each site's cluster: commits wait for one of its standbys (``method: any``)."""
    parameters: dict[str, str] = Field(default_factory=dict)
    database: str = Field(default="app", pattern=r"^[a-z_][a-z0-9_]*$")
    owner: str = Field(default="app", pattern=r"^[a-z_][a-z0-9_]*$")
    replication_secret: str = "{cluster}-replication"
    """Secret (in each site's namespace) with the client certificate of ``streaming_replica``
    for streaming from ``{cluster}``: CloudNativePG's own by default; certificates issued by
    the site CAs work as well."""
    ca_secret: str = "{cluster}-ca"
    """Secret holding the CA (``ca.crt``) that signed ``{cluster}``'s server certificate."""

    required_capabilities: ClassVar[frozenset[type]] = frozenset({KubernetesApi})

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, str]) -> dict[str, str]:
        owned = sorted(set(value) & OWNED_PARAMETERS)
        if owned:
            raise ValueError(f"parameters: {', '.join(owned)} are managed by the Score")
        return value

    @model_validator(mode="after")
    def _names(self) -> CloudNativePGSpec:
        for site in self.sites:
            name = f"{self.name}-{site}"
            if len(name) > 50 or not _dns_label(name):
                raise ValueError(f"sites: cluster name {name!r} is not a short DNS label")
        return self

    def cluster_name(self, site: str) -> str:
        return f"{self.name}-{site}"

    def interpret(self, topology: Provides[KubernetesApi]) -> CloudNativePGInterpret:
        return CloudNativePGInterpret(self, resolve(topology))

    def cluster(
        self,
        ctx: RunContext,
        *,
        primary_site: str,
        bootstrap: Bootstrap | None = None,
        promotion_token: str | None = None,
        hibernate: bool = False,
    ) -> Cluster:
        """The ``Cluster`` of ``ctx.site`` in a topology whose primary is ``primary_site``."""
        me = self.cluster_name(ctx.site)
        primary = self.cluster_name(primary_site)
        others = [s for s in self.sites if s != ctx.site]
        source = primary if primary_site != ctx.site else self.cluster_name(others[0])
        if bootstrap is None:
            bootstrap = (
                Bootstrap(initdb=InitDb(database=self.database, owner=self.owner))
                if primary_site == ctx.site
                else Bootstrap(pg_basebackup=PgBaseBackup(source=primary))
            )
        annotations = {TOKEN_ANNOTATION: str(ctx.fencing_token)}
        if hibernate:
            annotations[HIBERNATION] = "on"
        return Cluster(
            metadata=ObjectMeta(
                name=me,
                namespace=self.namespace,
                labels={
                    "app.kubernetes.io/managed-by": FIELD_MANAGER,
                    "harmony/app": ctx.app,
                    "harmony/site": ctx.site,
                },
                annotations=annotations,
            ),
            spec=ClusterSpec(
                instances=self.instances,
                image_name=self.image_name,
                storage=Storage(size=self.storage_size, storage_class=self.storage_class),
                bootstrap=bootstrap,
                external_clusters=[self._external(site) for site in self.sites],
                replica=ReplicaConfig(
                    self_=me, primary=primary, source=source, promotion_token=promotion_token
                ),
                postgresql=PostgresConfig(
                    parameters=dict(self.parameters),
                    synchronous=Synchronous() if self.synchronous else None,
                ),
            ),
        )

    def _external(self, site: str) -> ExternalCluster:
        cluster = self.cluster_name(site)
        where = self.sites[site]
        replication = self.replication_secret.format(cluster=cluster)
        return ExternalCluster(
            name=cluster,
            connection_parameters={
                "host": where.host,
                "port": str(where.port),
                "user": "streaming_replica",
                "dbname": "postgres",
                "sslmode": "verify-full",
            },
            ssl_cert=SecretKeySelector(name=replication, key="tls.crt"),
            ssl_key=SecretKeySelector(name=replication, key="tls.key"),
            ssl_root_cert=SecretKeySelector(
                name=self.ca_secret.format(cluster=cluster), key="ca.crt"
            ),
        )


def _dns_label(name: str) -> bool:
    return re.fullmatch(DNS_LABEL, name) is not None


# ------------------------------------------------------------------ the Interpret
class CloudNativePGInterpret(ReplicatedInterpret):
    """Role changes as server-side applies of this site's ``Cluster``."""

    enforces_deadline: ClassVar[bool] = False

    def __init__(self, spec: CloudNativePGSpec, api: KubernetesApi) -> None:
        self.spec = spec
        self._api = api
        self._ctx: RunContext | None = None
        self._promotion_token: str | None = None

    def attach(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def prepare_promotion(self, demotion_token: str | None) -> None:
        """The old primary's ``status.demotionToken`` (carried by the controller), used by the
        next ``promote()``: CloudNativePG then promotes only once it has replayed up to it."""
        self._promotion_token = demotion_token

    def endpoint(self) -> dict[str, Any]:
        ctx = self._ctx
        if ctx is None:
            return {}
        site = self.spec.sites.get(ctx.site)
        return {
            "cluster": self.spec.cluster_name(ctx.site),
            "host": site.host if site else None,
            "port": site.port if site else None,
            "site": ctx.site,
            "node": ctx.node,
        }

    async def start_primary(self, ctx: RunContext) -> Outcome:
        return await self._apply(ctx, primary_site=ctx.site, what="primary cluster")

    async def start_replica(self, ctx: RunContext, primary: PrimaryInfo) -> Outcome:
        return await self._apply(ctx, primary_site=primary.site, what="replica cluster")

    async def promote(self, ctx: RunContext) -> Outcome:
        token, self._promotion_token = self._promotion_token, None
        outcome = await self._apply(
            ctx, primary_site=ctx.site, promotion_token=token, what="promoted"
        )
        if outcome.ok and token:
            return Outcome.done(f"{outcome.message} (waits to replay up to the demotion token)")
        return outcome

    async def demote(self, primary: PrimaryInfo | None = None) -> Outcome:
        ctx = self._ctx
        if ctx is None:
            return Outcome.failed("demote: not attached (call start_* or attach first)")
        site = primary.site if primary else next(s for s in self.spec.sites if s != ctx.site)
        return await self._apply(ctx, primary_site=site, what="demoted to a replica cluster")

    async def demotion_token(self) -> str | None:
        """``status.demotionToken`` of this site's cluster once a demotion has completed."""
        current = await self._get()
        token = ((current or {}).get("status") or {}).get("demotionToken")
        return str(token) if token else None

    async def stop(self) -> Outcome:
        ctx = self._ctx
        if ctx is None:
            return Outcome.done("never started", changed=False)
        current = await self._get()
        if current is None:
            return Outcome.done("absent", changed=False)
        primary = ((current.get("spec") or {}).get("replica") or {}).get("primary", "")
        site = next((s for s in self.spec.sites if self.spec.cluster_name(s) == primary), ctx.site)
        return await self._apply(ctx, primary_site=site, hibernate=True, what="hibernated")

    async def status(self) -> ReplicationStatus:
        try:
            current = await self._get()
        except Exception as exc:
            return ReplicationStatus(Role.REPLICA, None, None, None, f"cannot read: {exc}")
        if current is None:
            return ReplicationStatus(Role.REPLICA, None, None, None, "no Cluster")
        replica = (current.get("spec") or {}).get("replica") or {}
        status = current.get("status") or {}
        role = Role.PRIMARY if replica.get("primary") == replica.get("self") else Role.REPLICA
        timeline = status.get("timelineID")
        detail = (
            f"{role} cluster {current['metadata']['name']}: {status.get('phase', 'unknown')}, "
            f"current primary {status.get('currentPrimary', '?')}"
        )
        if status.get("demotionToken"):
            detail += ", demotion token published"
        return ReplicationStatus(
            role, None, int(timeline) if timeline is not None else None, None, detail
        )

    async def observe(self) -> Observation:
        try:
            current = await self._get()
        except Exception as exc:
            return Observation(WorkloadState.FAILED, f"cannot read: {exc}", reason="unreachable")
        if current is None:
            return Observation(WorkloadState.STOPPED, "no Cluster", reason="absent")
        meta = current.get("metadata") or {}
        if (meta.get("annotations") or {}).get(HIBERNATION) == "on":
            return Observation(WorkloadState.STOPPED, "hibernated", reason="stopped")
        status = current.get("status") or {}
        ready, wanted = (
            status.get("readyInstances", 0),
            (current.get("spec") or {}).get("instances", 0),
        )
        detail = f"{status.get('phase', 'unknown')}: {ready}/{wanted} instances ready"
        reason = None if ready and ready >= wanted else "not-ready"
        return Observation(
            WorkloadState.RUNNING, detail, reason=reason, extra={"ready": ready, "desired": wanted}
        )

    # plumbing
    async def _get(self) -> dict[str, Any] | None:
        ctx = self._ctx
        if ctx is None:
            return None
        return await self._api.get(
            API_VERSION, "Cluster", self.spec.cluster_name(ctx.site), self.spec.namespace
        )

    async def _apply(
        self,
        ctx: RunContext,
        *,
        primary_site: str,
        what: str,
        promotion_token: str | None = None,
        hibernate: bool = False,
    ) -> Outcome:
        self._ctx = ctx
        if ctx.site not in self.spec.sites or primary_site not in self.spec.sites:
            return Outcome.failed(f"site {ctx.site!r} or {primary_site!r} is not in sites")
        try:
            current = await self._get()
            bootstrap = None
            if current is not None:  # bootstrap is immutable: keep what the cluster was made by
                existing = (current.get("spec") or {}).get("bootstrap")
                if existing:
                    bootstrap = Bootstrap.model_validate(existing)
            cluster = self.spec.cluster(
                ctx,
                primary_site=primary_site,
                bootstrap=bootstrap,
                promotion_token=promotion_token,
                hibernate=hibernate,
            )
            await self._api.apply(cluster.manifest(), field_manager=FIELD_MANAGER)
        except Exception as exc:  # network, HTTP, validation
            return Outcome.failed(f"{what}: server-side apply failed: {exc}")
        primary = self.spec.cluster_name(primary_site)
        return Outcome.done(f"{what}: Cluster {cluster.metadata.name} (primary {primary})")
