"""Kubernetes Scores: manifests valid for every supported API version; request shapes.

Validation uses the official OpenAPI schemas shipped by kubernetes-validate. Apply, stop and
observe run against ``fake_kube`` (an in-process HTTP stand-in), never a real cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from scores.base import Deadline, RunContext, WorkloadState
from scores.health import HealthSpec, builtin_failure, deadline_clock
from scores.k8s import KubernetesDeploymentSpec, KubernetesInterpret, KubernetesManifestsSpec
from tests.harness.wait import eventually
from tests.scores.fake_kube import FakeKube, fake_kube
from topologies.config import KubernetesConfig
from topologies.k8s import KubernetesTopology, plural, resource_path

SUPPORTED = [f"1.{minor}.0" for minor in range(29, 38)]
DEPLOY_PATH = "/apis/apps/v1/namespaces/apps/deployments/web"


def _deployment(**fields: Any) -> KubernetesDeploymentSpec:
    return KubernetesDeploymentSpec.model_validate(
        {
            "kind": "KubernetesDeployment",
            "name": "web",
            "namespace": "apps",
            "image": "nginx:1.27",
            "ports": [8080],
            "env": {"MODE": "primary"},
            "replicas": 2,
            "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "128Mi"}},
            **fields,
        }
    )


@pytest.fixture
async def kube() -> AsyncIterator[tuple[FakeKube, KubernetesTopology]]:
    async with fake_kube() as fake:
        topology = KubernetesTopology(
            fake.url, namespace="apps", auth_headers=lambda: {"Authorization": "Bearer t0ken"}
        )
        yield fake, topology
        await topology.close()


@pytest.mark.parametrize("version", SUPPORTED)
def test_deployment_manifest_validates_strictly(version: str, ctx: RunContext) -> None:
    for spec in (_deployment(), _deployment(command=["/bin/web"], args=["--port", "8080"])):
        for manifest in spec.manifests(ctx):
            kubernetes_validate.validate(manifest, version, strict=True)


def test_validation_would_catch_a_bad_manifest(ctx: RunContext) -> None:
    manifest = _deployment().manifests(ctx)[0]
    manifest["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, SUPPORTED[-1], strict=True)


def test_manifest_carries_contract_environment_and_selector(ctx: RunContext) -> None:
    manifest = _deployment().manifests(ctx)[0]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["HARMONY_FENCING_TOKEN"] == "7" and env["MODE"] == "primary"
    selector = manifest["spec"]["selector"]["matchLabels"]
    assert selector.items() <= manifest["spec"]["template"]["metadata"]["labels"].items()


async def test_apply_is_server_side_apply_by_harmony_agent(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    outcome = await _deployment().interpret(topology).apply(ctx)
    assert outcome.ok, outcome
    (request,) = fake.requests
    assert (request.method, request.path) == ("PATCH", DEPLOY_PATH)
    assert request.query == {"fieldManager": "harmony-agent", "force": "true"}
    assert request.content_type == "application/apply-patch+yaml"
    assert request.authorization == "Bearer t0ken"
    assert request.body == _deployment().manifests(ctx)[0]


async def test_stop_scales_to_zero_once(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    interpret = _deployment().interpret(topology)
    await interpret.apply(ctx)
    stopped = await interpret.stop()
    assert stopped.ok and stopped.changed
    scale, pods = fake.requests[-2:]
    assert (scale.method, scale.path) == ("PATCH", DEPLOY_PATH + "/scale")
    assert scale.content_type == "application/merge-patch+json"
    assert scale.body == {"spec": {"replicas": 0}}
    assert (pods.method, pods.path) == ("GET", "/api/v1/namespaces/apps/pods")
    assert pods.query == {"labelSelector": "app.kubernetes.io/name=web,harmony/app=ledger"}
    again = await interpret.stop()
    assert again.ok and not again.changed
    assert fake.requests[-1].method == "GET"
    assert (await interpret.observe()).state is WorkloadState.STOPPED


async def test_observe_reads_readiness(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    interpret = _deployment().interpret(topology)
    assert (await interpret.observe()).reason == "absent"
    await interpret.apply(ctx)
    obj = fake.objects[DEPLOY_PATH]
    obj["status"] = {"readyReplicas": 1}
    starting = await interpret.observe()
    assert (starting.state, starting.reason) == (WorkloadState.RUNNING, "not-ready")
    assert starting.extra == {"ready": 1, "desired": 2}
    obj["status"] = {"readyReplicas": 2}
    assert (await interpret.observe()).reason is None
    obj["status"] = {
        "conditions": [{"type": "Progressing", "status": "False", "message": "deadline exceeded"}]
    }
    failed = await interpret.observe()
    assert failed.state is WorkloadState.FAILED and "deadline exceeded" in failed.detail


async def test_api_errors_are_outcomes(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    fake.fail_with = 500
    interpret = _deployment().interpret(topology)
    applied = await interpret.apply(ctx)
    assert not applied.ok and "HTTP 500" in applied.message
    assert not (await interpret.stop()).ok
    assert (await interpret.observe()).reason == "unreachable"


async def test_manifests_score_applies_every_object_in_order(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "b"}},
        _deployment().manifests(ctx)[0],
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, SUPPORTED[-1], strict=True)
    spec = KubernetesManifestsSpec.model_validate(
        {"kind": "KubernetesManifests", "manifests": docs}
    )
    interpret = spec.interpret(topology)
    assert isinstance(interpret, KubernetesInterpret)
    assert (await interpret.apply(ctx)).ok
    assert [r.path for r in fake.requests] == [
        "/api/v1/namespaces/apps",
        "/api/v1/namespaces/apps/configmaps/cfg",
        DEPLOY_PATH,
    ]
    fake.objects[DEPLOY_PATH]["status"] = {"readyReplicas": 2}
    assert (await interpret.observe()).state is WorkloadState.RUNNING


def test_manifests_need_identity() -> None:
    with pytest.raises(ValueError, match=r"metadata\.name"):
        KubernetesManifestsSpec.model_validate(
            {
                "kind": "KubernetesManifests",
                "manifests": [{"apiVersion": "v1", "kind": "X", "metadata": {}}],
            }
        )


def test_resource_paths_follow_api_conventions() -> None:
    assert plural("NetworkPolicy") == "networkpolicies"
    assert plural("Ingress") == "ingresses"
    assert plural("Endpoints") == "endpoints"
    assert resource_path("rbac.authorization.k8s.io/v1", "ClusterRole", "x", "r") == (
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/r"
    )


async def test_kubeconfig_credentials_reach_the_requests(tmp_path: Path, ctx: RunContext) -> None:
    async with fake_kube() as fake:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": fake.url}}],
                    "users": [{"name": "u", "user": {"token": "from-kubeconfig"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        config = KubernetesConfig(kind="kubernetes", kubeconfig=kubeconfig, namespace="apps")
        topology = KubernetesTopology.from_config(config)
        try:
            assert (await _deployment().interpret(topology).apply(ctx)).ok
        finally:
            await topology.close()
        assert fake.requests[0].authorization == "Bearer from-kubeconfig"


def test_importing_topologies_and_scores_does_not_import_kubernetes() -> None:
    code = (
        "import sys, topologies, topologies.build, topologies.k8s, scores.spec, scores.check; "
        "sys.exit('kubernetes' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), check=False)
    assert result.returncode == 0


PODS = "/api/v1/namespaces/apps/pods"


async def _timed_out(interpret: KubernetesInterpret) -> bool:
    return (await interpret.observe()).reason == "not-ready-timeout"


def _pod(name: str, app: str = "ledger", web: str = "web") -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": web, "harmony/app": app}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}}


async def test_stop_returns_when_the_pods_are_gone(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    interpret = _deployment().interpret(topology)
    interpret.pod_poll = 0.01
    await interpret.apply(ctx)
    for name in ("web-1", "web-2"):
        fake.objects[f"{PODS}/{name}"] = _pod(name)
    fake.objects[f"{PODS}/other"] = _pod("other", web="other")  # not selected
    fake.lingering = {f"{PODS}/web-1": 2, f"{PODS}/web-2": 4}  # terminating for a while
    stopped = await interpret.stop()
    assert stopped.ok and stopped.changed, stopped
    assert stopped.message.startswith("scaled to zero: Deployment/web; pods gone after")
    lists = [r for r in fake.requests if r.path == PODS]
    assert len(lists) == 5, "polled until the last pod was gone"
    assert f"{PODS}/other" in fake.objects
    again = await interpret.stop()
    assert again.ok and not again.changed


async def test_stop_says_so_when_pods_outlive_the_deadline(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    interpret = _deployment().interpret(topology)
    interpret.pod_poll = 0.01
    await interpret.apply(ctx)
    fake.objects[f"{PODS}/web-1"] = _pod("web-1")  # never goes away
    interpret.set_deadline(Deadline(deadline_clock() + 0.2))
    stopped = await interpret.stop()
    assert not stopped.ok and stopped.changed
    assert "scaled to zero: Deployment/web; 1 pod(s) still present at the lease deadline" in (
        stopped.message
    )
    assert stopped.message.endswith(": web-1")
    seen = await interpret.observe()
    assert (seen.state, seen.reason) == (WorkloadState.STOPPED, "scaled-down")
    assert seen.extra["terminating"] == ["web-1"]

    budget = _deployment(stop_timeout="100ms").interpret(topology)
    budget.pod_poll = 0.01
    timed_out = await budget.stop()
    assert not timed_out.ok and "still present at the stop timeout" in timed_out.message
    assert not interpret.enforces_deadline
    assert interpret.deadline_note.startswith("deadline not enforced outside the agent")


async def test_not_ready_past_the_progress_deadline_is_a_failure(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    interpret = _deployment().interpret(topology)
    await interpret.apply(ctx)
    obj = fake.objects[DEPLOY_PATH]
    obj["spec"]["progressDeadlineSeconds"] = 3600
    obj["status"] = {"readyReplicas": 1}
    assert (await interpret.observe()).reason == "not-ready"
    obj["spec"]["progressDeadlineSeconds"] = 0  # the Deployment's own deadline is used
    failed = await interpret.observe()
    assert (failed.state, failed.reason) == (WorkloadState.FAILED, "not-ready-timeout")
    assert failed.detail.startswith("Deployment/web: 1/2 ready for ")
    assert builtin_failure(failed) == failed.detail
    obj["status"] = {"readyReplicas": 2}
    assert (await interpret.observe()).reason is None
    obj["status"] = {"readyReplicas": 0}
    assert (await interpret.observe()).reason == "not-ready", "a fresh not-ready stretch"

    own = _deployment(progress_deadline="1h").interpret(topology)
    assert (await own.observe()).reason == "not-ready"
    assert own.spec.manifests(ctx)[0]["spec"]["progressDeadlineSeconds"] == 3600

    quick = _deployment(progress_deadline="1ms").interpret(topology)
    await quick.apply(ctx)
    fake.objects[DEPLOY_PATH]["status"] = {"readyReplicas": 0}
    assert (await quick.observe()).reason == "not-ready"  # the stretch starts now
    await eventually(lambda: _timed_out(quick), what="past the progress deadline")
    await quick.apply(RunContext("ledger", "site-a", "node-1", 8, ctx.state_dir))
    fake.objects[DEPLOY_PATH]["status"] = {"readyReplicas": 0}
    assert (await quick.observe()).reason == "not-ready", "a new rollout, a new deadline"


async def test_not_progressing_is_a_builtin_failure(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    interpret = _deployment().interpret(topology)
    await interpret.apply(ctx)
    fake.objects[DEPLOY_PATH]["status"] = {
        "conditions": [
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ]
    }
    seen = await interpret.observe()
    assert (seen.state, seen.reason) == (WorkloadState.FAILED, "not-progressing")
    assert builtin_failure(seen) == "Deployment/web: ProgressDeadlineExceeded"


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ({"exec": ["pg_isready", "-q"]}, {"exec": {"command": ["pg_isready", "-q"]}}),
        (
            {"http": "http://127.0.0.1:8080/healthz?full=1"},
            {"httpGet": {"path": "/healthz?full=1", "port": 8080, "scheme": "HTTP"}},
        ),
        ({"tcp": "127.0.0.1:5432"}, {"tcpSocket": {"port": 5432}}),
        ({"tcp": "db.internal:5432"}, {"tcpSocket": {"port": 5432, "host": "db.internal"}}),
    ],
)
def test_health_probe_becomes_the_pods_readiness_probe(
    probe: dict[str, Any], expected: dict[str, Any], ctx: RunContext
) -> None:
    health = HealthSpec.model_validate(
        {"probe": probe, "period": "2s", "timeout": "500ms", "failure_threshold": 4}
    )
    interpret = _deployment().interpret(KubernetesTopology("https://k8s.invalid"))
    interpret.use_health(health)
    manifest = _deployment().manifests(ctx, health)[0]
    readiness = manifest["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert readiness == {
        **expected,
        "periodSeconds": 2,
        "timeoutSeconds": 1,
        "failureThreshold": 4,
        "successThreshold": 1,
    }
    for version in SUPPORTED:
        kubernetes_validate.validate(manifest, version, strict=True)
    manifests = KubernetesManifestsSpec.model_validate(
        {"kind": "KubernetesManifests", "manifests": [manifest]}
    ).interpret(KubernetesTopology("https://k8s.invalid"))
    with pytest.raises(ValueError, match="readinessProbe"):
        manifests.use_health(health)


async def test_stateful_sets_are_scaled_through_their_scale_subresource(
    kube: tuple[FakeKube, KubernetesTopology], ctx: RunContext
) -> None:
    fake, topology = kube
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "apps"},
        "spec": {
            "replicas": 1,
            "serviceName": "db",
            "selector": {
                "matchLabels": {"app": "db"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
            },
            "template": {
                "metadata": {"labels": {"app": "db", "tier": "a"}},
                "spec": {"containers": [{"name": "db", "image": "postgres:16"}]},
            },
        },
    }
    kubernetes_validate.validate(sts, SUPPORTED[-1], strict=True)
    interpret = KubernetesManifestsSpec.model_validate(
        {"kind": "KubernetesManifests", "manifests": [sts]}
    ).interpret(topology)
    await interpret.apply(ctx)
    assert (await interpret.stop()).ok
    scale, pods = fake.requests[-2:]
    assert (scale.method, scale.path) == (
        "PATCH",
        "/apis/apps/v1/namespaces/apps/statefulsets/db/scale",
    )
    assert pods.query == {"labelSelector": "app=db,tier in (a,b)"}
