"""``KubernetesDeployment`` and ``KubernetesManifests``: objects applied server-side.

Manifests are built from the kubernetes client's typed models (``V1Deployment``...), so a
misspelt field is an error here rather than a silent drop at the API server. The models are
imported when a manifest is built, never when the agent merely parses an Application.

Stop means stopped: workloads are scaled to zero, then their pods (found by the workload's
own selector) are polled until they are gone or the stop deadline passes; the Outcome says
which. Nothing outside the agent enforces the lease deadline here: a hung agent leaves the
pods running (``enforces_deadline`` is False, ``DEADLINE_NOT_ENFORCED`` says so).
"""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from scores.base import (
    Deadline,
    Interpret,
    Observation,
    Outcome,
    RunContext,
    Score,
    WorkloadState,
)
from scores.duration import Duration, format_duration
from scores.health import HealthSpec, deadline_clock
from topologies.capabilities import KubernetesApi
from topologies.higher_order import Provides, resolve

FIELD_MANAGER = "harmony-agent"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SCALABLE = {("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"), ("apps/v1", "ReplicaSet")}
DEFAULT_PROGRESS_DEADLINE = 600.0
"""The API server's default ``progressDeadlineSeconds``."""
DEADLINE_NOT_ENFORCED = (
    "deadline not enforced outside the agent: a hung or partitioned agent leaves the pods "
    "running past its lease"
)
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


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
    stop_timeout: Duration = 30.0
    """How long a stop waits for the pods to be gone (never past the lease deadline)."""
    progress_deadline: Duration | None = None
    """Not ready for this long counts as failed; also the Deployment's progressDeadlineSeconds.
    None: the Deployment's own (600 s by default)."""

    required_capabilities: ClassVar[frozenset[type]] = frozenset({KubernetesApi})

    def interpret(self, topology: Provides[KubernetesApi]) -> KubernetesInterpret:
        return KubernetesInterpret(self, resolve(topology))

    def manifests(self, ctx: RunContext, health: HealthSpec | None = None) -> list[dict[str, Any]]:
        return [deployment_manifest(self, ctx, health)]


class KubernetesManifestsSpec(Score):
    """Arbitrary objects; Deployments, StatefulSets and ReplicaSets are scaled to stop."""

    kind: Literal["KubernetesManifests"] = "KubernetesManifests"
    manifests_: list[dict[str, Any]] = Field(alias="manifests", min_length=1)
    stop_timeout: Duration = 30.0
    """How long a stop waits for the pods to be gone (never past the lease deadline)."""
    progress_deadline: Duration | None = None
    """Not ready for this long counts as failed; None: each workload's progressDeadlineSeconds
    (600 s when it has none)."""

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

    def manifests(self, ctx: RunContext, health: HealthSpec | None = None) -> list[dict[str, Any]]:
        del ctx, health  # probes go in the manifests' own readinessProbe
        return [dict(doc) for doc in self.manifests_]


def readiness_probe(health: HealthSpec) -> dict[str, Any]:
    """``spec.health`` as a container readinessProbe (JSON): the pod's own readiness is the
    probe. ``127.0.0.1``/``localhost`` in a URL or address means the pod itself."""
    probe = health.probe
    if probe is None:
        raise ValueError("health has no probe")
    action: dict[str, Any]
    if probe.exec is not None:
        action = {"exec": {"command": list(probe.exec)}}
    elif probe.http is not None:
        parts = urlsplit(probe.http)
        get: dict[str, Any] = {
            "path": (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            "port": parts.port or (443 if parts.scheme == "https" else 80),
            "scheme": parts.scheme.upper(),
        }
        if parts.hostname not in _LOOPBACK:
            get["host"] = parts.hostname
        action = {"httpGet": get}
    else:
        host, _, port = str(probe.tcp).rpartition(":")
        tcp: dict[str, Any] = {"port": int(port)}
        if host.strip("[]") not in _LOOPBACK:
            tcp["host"] = host.strip("[]")
        action = {"tcpSocket": tcp}
    return {
        **action,
        "periodSeconds": max(1, math.ceil(health.period)),
        "timeoutSeconds": max(1, math.ceil(health.timeout)),
        "failureThreshold": health.failure_threshold,
        "successThreshold": 1,
    }


def deployment_manifest(
    spec: KubernetesDeploymentSpec, ctx: RunContext, health: HealthSpec | None = None
) -> dict[str, Any]:
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
    if spec.progress_deadline is not None:
        manifest["spec"]["progressDeadlineSeconds"] = max(1, math.ceil(spec.progress_deadline))
    if health is not None and health.probe is not None:
        manifest["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = readiness_probe(
            health
        )
    return manifest


def _ident(doc: Mapping[str, Any]) -> tuple[str, str, str, str | None]:
    meta = doc.get("metadata") or {}
    return str(doc["apiVersion"]), str(doc["kind"]), str(meta["name"]), meta.get("namespace")


class KubernetesInterpret(Interpret):
    """Apply = server-side apply of every manifest; stop = scale workloads to zero and wait
    until their pods are gone."""

    enforces_deadline: ClassVar[bool] = False
    deadline_note: ClassVar[str] = DEADLINE_NOT_ENFORCED
    pod_poll: float = 0.5
    """Seconds between two pod listings while a stop waits."""

    def __init__(
        self, spec: KubernetesDeploymentSpec | KubernetesManifestsSpec, api: KubernetesApi
    ) -> None:
        self.spec = spec
        self._api = api
        self._last: list[dict[str, Any]] = []
        self._health: HealthSpec | None = None
        self._deadline: float | None = None
        self._not_ready_since: dict[tuple[str, str, str | None], float] = {}
        self._terminating: list[str] = []

    def _targets(self) -> list[tuple[str, str, str, str | None]]:
        if isinstance(self.spec, KubernetesDeploymentSpec):
            return [("apps/v1", "Deployment", self.spec.name, self.spec.namespace)]
        return [_ident(doc) for doc in self.spec.manifests_]

    # --- health and deadline ---------------------------------------------------------------

    def use_health(self, health: HealthSpec) -> None:
        """Run ``health.probe`` as the container's readinessProbe (KubernetesDeployment)."""
        if isinstance(self.spec, KubernetesManifestsSpec):
            raise ValueError(
                "KubernetesManifests cannot take an agent probe; give its containers a "
                "readinessProbe"
            )
        self._health = health

    def set_deadline(self, deadline: Deadline | None) -> None:
        """Not enforced outside the agent; a stop waits for pods no longer than this."""
        self._deadline = deadline.at if deadline is not None else None

    # --- apply / stop / observe ----------------------------------------------------------

    async def apply(self, ctx: RunContext) -> Outcome:
        self._deadline = ctx.deadline.at if ctx.deadline is not None else None
        try:
            docs = self.spec.manifests(ctx, self._health)
            for doc in docs:
                await self._api.apply(doc, field_manager=FIELD_MANAGER)
        except Exception as exc:  # network, HTTP and kubernetes import errors alike
            return Outcome.failed(f"server-side apply failed: {exc}")
        if docs != self._last:
            self._not_ready_since.clear()  # a new rollout gets its own progress deadline
        self._last = docs
        self._terminating = []
        names = ", ".join(f"{kind}/{name}" for _, kind, name, _ in self._targets())
        return Outcome.done(f"applied {names}")

    async def stop(self) -> Outcome:
        scaled: list[str] = []
        selectors: list[tuple[str | None, str]] = []
        budget = self.spec.stop_timeout
        started = deadline_clock()
        until = started + budget
        if self._deadline is not None:
            until = min(until, self._deadline)
        try:
            for api_version, kind, name, namespace in self._targets():
                if (api_version, kind) not in SCALABLE:
                    continue
                current = await self._api.get(api_version, kind, name, namespace)
                if current is None:
                    continue
                selector = label_selector((current.get("spec") or {}).get("selector"))
                if selector:
                    selectors.append((namespace, selector))
                if (current.get("spec") or {}).get("replicas") == 0:
                    continue
                patch = {"spec": {"replicas": 0}}
                await self._api.patch(
                    api_version, kind, name, patch, namespace=namespace, subresource="scale"
                )
                scaled.append(f"{kind}/{name}")
            left, present = await self._wait_for_pods(selectors, until)
        except Exception as exc:
            return Outcome.failed(f"scaling to zero failed: {exc}")
        took = deadline_clock() - started
        what = "scaled to zero: " + ", ".join(scaled) if scaled else "already scaled to zero"
        if left:
            self._terminating = left
            shown = ", ".join(left[:5]) + (" ..." if len(left) > 5 else "")
            end = "the lease deadline" if until != started + budget else "the stop timeout"
            return Outcome(
                False,
                f"{what}; {len(left)} pod(s) still present at {end} after {took:.1f}s: {shown}",
                bool(scaled),
            )
        self._terminating = []
        if not scaled and not present:
            return Outcome.done("already scaled to zero, no pods left", changed=False)
        return Outcome.done(f"{what}; pods gone after {took:.1f}s")

    async def _wait_for_pods(
        self, selectors: list[tuple[str | None, str]], until: float
    ) -> tuple[list[str], bool]:
        """(names of pods still present when ``until`` passed, [] once all are gone;
        whether any pod was there at first)."""
        present = False
        while True:
            left: list[str] = []
            for namespace, selector in selectors:
                pods = await self._api.list(
                    "v1", "Pod", namespace=namespace, label_selector=selector
                )
                left += [str((pod.get("metadata") or {}).get("name")) for pod in pods]
            present = present or bool(left)
            if not left or deadline_clock() >= until:
                return left, present
            await asyncio.sleep(min(self.pod_poll, max(0.0, until - deadline_clock())))

    async def observe(self) -> Observation:
        ready_total = desired_total = 0
        now = deadline_clock()
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
                        WorkloadState.FAILED, f"{kind}/{name}: {failed}", reason="not-progressing"
                    )
                desired = int((obj.get("spec") or {}).get("replicas", 1))
                ready = int((obj.get("status") or {}).get("readyReplicas") or 0)
                desired_total += desired
                ready_total += ready
                key = (kind, name, namespace)
                if desired == 0 or ready >= desired:
                    self._not_ready_since.pop(key, None)
                    continue
                since = self._not_ready_since.setdefault(key, now)
                limit = self._progress_deadline(obj)
                if now - since > limit:
                    detail = (
                        f"{kind}/{name}: {ready}/{desired} ready for {now - since:.0f}s "
                        f"(progress deadline {format_duration(limit)})"
                    )
                    return Observation(WorkloadState.FAILED, detail, reason="not-ready-timeout")
        except Exception as exc:
            return Observation(WorkloadState.FAILED, f"cannot read: {exc}", reason="unreachable")
        extra: dict[str, Any] = {"ready": ready_total, "desired": desired_total}
        detail = f"{ready_total}/{desired_total} replicas ready"
        if desired_total == 0 and self._has_scalable():
            detail = "scaled to zero"
            if self._terminating:
                extra["terminating"] = list(self._terminating)
                detail += f", {len(self._terminating)} pod(s) were still terminating at the stop"
            return Observation(WorkloadState.STOPPED, detail, reason="scaled-down", extra=extra)
        reason = None if ready_total >= desired_total else "not-ready"
        return Observation(WorkloadState.RUNNING, detail, reason=reason, extra=extra)

    def _progress_deadline(self, obj: Mapping[str, Any]) -> float:
        if self.spec.progress_deadline is not None:
            return self.spec.progress_deadline
        own = (obj.get("spec") or {}).get("progressDeadlineSeconds")
        return float(own) if isinstance(own, int | float) else DEFAULT_PROGRESS_DEADLINE

    def _has_scalable(self) -> bool:
        return any((api, kind) in SCALABLE for api, kind, _, _ in self._targets())


def label_selector(selector: Mapping[str, Any] | None) -> str:
    """A LabelSelector object as the ``labelSelector`` query string ("" matches nothing here)."""
    if not selector:
        return ""
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(str(key))
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
    return ",".join(terms)


def _failed_condition(obj: Mapping[str, Any]) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return str(cond.get("message") or cond.get("reason") or "not progressing")
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return str(cond.get("message") or "replica failure")
    return None
