"""``KubernetesDeployment`` and ``KubernetesManifests``: objects applied server-side.

Manifests are built from the kubernetes client's typed models (``V1Deployment``...), so a
misspelt field is an error here rather than a silent drop at the API server. The models are
imported when a manifest is built, never when the agent merely parses an Application.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from scores.base import Interpret, Observation, Outcome, RunContext, Score, WorkloadState
from topologies.capabilities import KubernetesApi
from topologies.higher_order import Provides, resolve

FIELD_MANAGER = "harmony-agent"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SCALABLE = {("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"), ("apps/v1", "ReplicaSet")}


class KubernetesDeploymentSpec(Score):
    """One container image run as a Deployment."""

    kind: Literal["KubernetesDeployment"] = "KubernetesDeployment"
    name: str = Field(pattern=DNS_LABEL, max_length=63)
    namespace: str | None = Field(default=None, pattern=DNS_LABEL, max_length=63)
    image: str = Field(min_length=1)
    command: list[str] | None = None
    args: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    replicas: int = Field(default=1, ge=1)
    ports: list[int] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    resources: dict[Literal["requests", "limits"], dict[str, str]] = Field(default_factory=dict)

    required_capabilities: ClassVar[frozenset[type]] = frozenset({KubernetesApi})

    def interpret(self, topology: Provides[KubernetesApi]) -> KubernetesInterpret:
        return KubernetesInterpret(self, resolve(topology))

    def manifests(self, ctx: RunContext) -> list[dict[str, Any]]:
        return [deployment_manifest(self, ctx)]


class KubernetesManifestsSpec(Score):
    """Arbitrary objects; Deployments, StatefulSets and ReplicaSets are scaled to stop."""

    kind: Literal["KubernetesManifests"] = "KubernetesManifests"
    manifests_: list[dict[str, Any]] = Field(alias="manifests", min_length=1)

    required_capabilities: ClassVar[frozenset[type]] = frozenset({KubernetesApi})

    @field_validator("manifests_")
    @classmethod
    def _identified(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, doc in enumerate(value):
            meta = doc.get("metadata")
            if not (doc.get("apiVersion") and doc.get("kind") and isinstance(meta, dict)):
                raise ValueError(f"manifest {index}: needs apiVersion, kind and metadata")
            if not meta.get("name"):
                raise ValueError(f"manifest {index}: needs metadata.name")
        return value

    def interpret(self, topology: Provides[KubernetesApi]) -> KubernetesInterpret:
        return KubernetesInterpret(self, resolve(topology))

    def manifests(self, ctx: RunContext) -> list[dict[str, Any]]:
        del ctx
        return [dict(doc) for doc in self.manifests_]


def deployment_manifest(spec: KubernetesDeploymentSpec, ctx: RunContext) -> dict[str, Any]:
    """The Deployment as JSON, built with the typed V1 models of the kubernetes client."""
    k: Any = importlib.import_module("kubernetes.client")
    selector = {"app.kubernetes.io/name": spec.name, "harmony/app": ctx.app}
    labels = {**spec.labels, **selector, "app.kubernetes.io/managed-by": FIELD_MANAGER}
    env = {**spec.env, **ctx.harmony_env()}
    container = k.V1Container(
        name=spec.name,
        image=spec.image,
        command=spec.command,
        args=spec.args,
        env=[k.V1EnvVar(name=key, value=value) for key, value in sorted(env.items())],
        ports=[k.V1ContainerPort(container_port=port) for port in spec.ports] or None,
        resources=k.V1ResourceRequirements(**spec.resources) if spec.resources else None,
    )
    deployment = k.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=k.V1ObjectMeta(
            name=spec.name,
            namespace=spec.namespace,
            labels=labels,
            annotations={"harmony/fencing-token": str(ctx.fencing_token)},
        ),
        spec=k.V1DeploymentSpec(
            replicas=spec.replicas,
            selector=k.V1LabelSelector(match_labels=selector),
            template=k.V1PodTemplateSpec(
                metadata=k.V1ObjectMeta(labels=labels),
                spec=k.V1PodSpec(containers=[container]),
            ),
        ),
    )
    manifest: dict[str, Any] = k.ApiClient().sanitize_for_serialization(deployment)
    return manifest


def _ident(doc: Mapping[str, Any]) -> tuple[str, str, str, str | None]:
    meta = doc.get("metadata") or {}
    return str(doc["apiVersion"]), str(doc["kind"]), str(meta["name"]), meta.get("namespace")


class KubernetesInterpret(Interpret):
    """Apply = server-side apply of every manifest; stop = scale workloads to zero."""

    def __init__(
        self, spec: KubernetesDeploymentSpec | KubernetesManifestsSpec, api: KubernetesApi
    ) -> None:
        self.spec = spec
        self._api = api
        self._last: list[dict[str, Any]] = []

    def _targets(self) -> list[tuple[str, str, str, str | None]]:
        if isinstance(self.spec, KubernetesDeploymentSpec):
            return [("apps/v1", "Deployment", self.spec.name, self.spec.namespace)]
        return [_ident(doc) for doc in self.spec.manifests_]

    async def apply(self, ctx: RunContext) -> Outcome:
        try:
            docs = self.spec.manifests(ctx)
            for doc in docs:
                await self._api.apply(doc, field_manager=FIELD_MANAGER)
        except Exception as exc:  # network, HTTP and kubernetes import errors alike
            return Outcome.failed(f"server-side apply failed: {exc}")
        self._last = docs
        names = ", ".join(f"{kind}/{name}" for _, kind, name, _ in self._targets())
        return Outcome.done(f"applied {names}")

    async def stop(self) -> Outcome:
        scaled: list[str] = []
        try:
            for api_version, kind, name, namespace in self._targets():
                if (api_version, kind) not in SCALABLE:
                    continue
                current = await self._api.get(api_version, kind, name, namespace)
                if current is None or (current.get("spec") or {}).get("replicas") == 0:
                    continue
                patch = {"spec": {"replicas": 0}}
                await self._api.patch(
                    api_version, kind, name, patch, namespace=namespace, subresource="scale"
                )
                scaled.append(f"{kind}/{name}")
        except Exception as exc:
            return Outcome.failed(f"scaling to zero failed: {exc}")
        if not scaled:
            return Outcome.done("already scaled to zero", changed=False)
        return Outcome.done("scaled to zero: " + ", ".join(scaled))

    async def observe(self) -> Observation:
        ready_total = desired_total = 0
        try:
            for api_version, kind, name, namespace in self._targets():
                obj = await self._api.get(api_version, kind, name, namespace)
                if obj is None:
                    return Observation(
                        WorkloadState.STOPPED, f"{kind}/{name} absent", reason="absent"
                    )
                if (api_version, kind) not in SCALABLE:
                    continue
                failed = _failed_condition(obj)
                if failed:
                    return Observation(
                        WorkloadState.FAILED, f"{kind}/{name}: {failed}", reason="failed"
                    )
                desired_total += int((obj.get("spec") or {}).get("replicas", 1))
                ready_total += int((obj.get("status") or {}).get("readyReplicas") or 0)
        except Exception as exc:
            return Observation(WorkloadState.FAILED, f"cannot read: {exc}", reason="unreachable")
        extra = {"ready": ready_total, "desired": desired_total}
        detail = f"{ready_total}/{desired_total} replicas ready"
        if desired_total == 0 and self._has_scalable():
            return Observation(
                WorkloadState.STOPPED, "scaled to zero", reason="scaled-down", extra=extra
            )
        reason = None if ready_total >= desired_total else "not-ready"
        return Observation(WorkloadState.RUNNING, detail, reason=reason, extra=extra)

    def _has_scalable(self) -> bool:
        return any((api, kind) in SCALABLE for api, kind, _, _ in self._targets())


def _failed_condition(obj: Mapping[str, Any]) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return str(cond.get("message") or cond.get("reason") or "not progressing")
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return str(cond.get("message") or "replica failure")
    return None
