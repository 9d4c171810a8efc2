"""CloudNativePG: typed Cluster manifests checked against the CRD's schema, request shapes
against ``fake_kube`` (no Kubernetes API server can run here), and a controlled switchover
through the demotion/promotion token."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.application import parse_documents
from scores.base import RunContext, WorkloadState
from scores.postgres.cnpg import CloudNativePGInterpret, CloudNativePGSpec
from scores.roles import PrimaryInfo, Role
from tests.scores.fake_kube import FakeKube, fake_kube
from topologies.k8s import KubernetesTopology

SCHEMA = json.loads(Path(__file__).with_name("cnpg").joinpath("cluster_schema.json").read_text())
BASE = "/apis/postgresql.cnpg.io/v1/namespaces/db/clusters"


def check(value: Any, kind: str, where: str = "spec") -> list[str]:
    """Problems of ``value`` against a type of the CRD schema (interfaces, enums, scalars)."""
    kind = kind.strip()
    if kind.endswith("[]"):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, item in enumerate(value) for p in check(item, kind[:-2], f"{where}[{i}]")]
    if kind.startswith("{"):
        inner = re.match(r"\{ \[key: string\]: (.*); \}$", kind)
        if not isinstance(value, dict) or inner is None:
            return [f"{where}: expected a map"]
        return [p for k, v in value.items() for p in check(v, inner.group(1), f"{where}.{k}")]
    if kind == "string":
        return [] if isinstance(value, str) else [f"{where}: expected a string"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{where}: expected a boolean"]
    if kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number"]
    if kind == "number | string":
        return [] if isinstance(value, int | float | str) else [f"{where}: int or string"]
    if kind in SCHEMA["enums"]:
        allowed = SCHEMA["enums"][kind]
        return [] if value in allowed else [f"{where}: {value!r} not one of {allowed}"]
    fields = SCHEMA["interfaces"].get(kind)
    if fields is None:
        return [f"{where}: unknown schema type {kind}"]
    if not isinstance(value, dict):
        return [f"{where}: expected an object"]
    problems = [f"{where}.{k}: not in the CRD" for k in value if k not in fields]
    missing = [k for k, f in fields.items() if f["required"] and k not in value]
    problems += [f"{where}.{k}: required" for k in missing]
    for key, item in value.items():
        if key in fields:
            problems += check(item, fields[key]["type"], f"{where}.{key}")
    return problems


def validate(manifest: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == "postgresql.cnpg.io/v1" and manifest["kind"] == "Cluster"
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    problems = check(manifest["spec"], "ClusterSpec")
    assert not problems, problems


SPEC = {
    "kind": "CloudNativePG",
    "name": "ledger",
    "namespace": "db",
    "sites": {
        "site-a": {"host": "ledger-rw.db.site-a.example"},
        "site-b": {"host": "ledger-rw.db.site-b.example"},
        "site-c": {"host": "ledger-rw.db.site-c.example", "port": 5433},
    },
    "synchronous": True,
    "parameters": {"max_connections": "200"},
}


def _spec(**fields: Any) -> CloudNativePGSpec:
    return CloudNativePGSpec.model_validate({**SPEC, **fields})


def _ctx(site: str, token: int = 7) -> RunContext:
    return RunContext("ledger", site, "n1", token, Path("/nonexistent"))


@pytest.fixture
async def kube() -> AsyncIterator[tuple[FakeKube, KubernetesTopology]]:
    async with fake_kube() as fake:
        topology = KubernetesTopology(fake.url, namespace="db")
        yield fake, topology
        await topology.close()


def test_manifests_for_every_role_match_the_crd_schema() -> None:
    spec = _spec()
    for site in spec.sites:
        for primary in spec.sites:
            cluster = spec.cluster(_ctx(site), primary_site=primary, promotion_token="tok")
            validate(cluster.manifest())
    validate(spec.cluster(_ctx("site-a"), primary_site="site-a", hibernate=True).manifest())


def test_the_schema_check_catches_a_bad_manifest() -> None:
    manifest = _spec().cluster(_ctx("site-a"), primary_site="site-a").manifest()
    manifest["spec"]["replica"]["primaryCluster"] = "typo"
    del manifest["spec"]["replica"]["source"]
    manifest["spec"]["instances"] = "three"
    manifest["spec"]["postgresql"]["synchronous"]["method"] = "all"
    problems = check(manifest["spec"], "ClusterSpec")
    assert "spec.replica.primaryCluster: not in the CRD" in problems
    assert "spec.replica.source: required" in problems
    assert "spec.instances: expected a number" in problems
    assert any("spec.postgresql.synchronous.method" in p for p in problems)


def test_primary_and_replica_clusters_of_the_distributed_topology() -> None:
    spec = _spec()
    primary = spec.cluster(_ctx("site-a"), primary_site="site-a").manifest()
    assert primary["metadata"]["name"] == "ledger-site-a"
    assert primary["spec"]["replica"] == {
        "self": "ledger-site-a",
        "primary": "ledger-site-a",
        "source": "ledger-site-b",
    }
    assert primary["spec"]["bootstrap"] == {
        "initdb": {"database": "app", "owner": "app", "dataChecksums": True}
    }
    assert [c["name"] for c in primary["spec"]["externalClusters"]] == [
        "ledger-site-a",
        "ledger-site-b",
        "ledger-site-c",
    ]
    site_c = primary["spec"]["externalClusters"][2]
    assert site_c["connectionParameters"]["port"] == "5433"
    assert site_c["connectionParameters"]["sslmode"] == "verify-full"
    assert site_c["sslCert"] == {"name": "ledger-site-c-replication", "key": "tls.crt"}
    assert site_c["sslRootCert"] == {"name": "ledger-site-c-ca", "key": "ca.crt"}
    assert primary["spec"]["postgresql"]["synchronous"] == {
        "method": "any",
        "number": 1,
        "dataDurability": "required",
    }
    replica = spec.cluster(_ctx("site-b"), primary_site="site-a").manifest()
    assert replica["spec"]["replica"] == {
        "self": "ledger-site-b",
        "primary": "ledger-site-a",
        "source": "ledger-site-a",
    }
    assert replica["spec"]["bootstrap"] == {"pg_basebackup": {"source": "ledger-site-a"}}


def test_the_application_parses_and_owned_parameters_are_refused() -> None:
    doc = {
        "apiVersion": "harmony/v1",
        "kind": "Application",
        "metadata": {"name": "ledger"},
        "spec": {"trait": "stateful", "placement": {"sites": ["site-a", "site-b"]}, "score": SPEC},
    }
    (app,) = parse_documents(json.dumps(doc))
    assert isinstance(app.spec.score, CloudNativePGSpec)
    with pytest.raises(ValueError, match="managed by the Score"):
        _spec(parameters={"synchronous_standby_names": "*"})


async def test_switchover_through_the_demotion_and_promotion_token(
    kube: tuple[FakeKube, KubernetesTopology],
) -> None:
    fake, topology = kube
    spec = _spec()
    a, b = spec.interpret(topology), spec.interpret(topology)
    assert isinstance(a, CloudNativePGInterpret)

    started = await a.start_primary(_ctx("site-a", token=7))
    assert started.ok, started
    request = fake.requests[-1]
    assert (request.method, request.path) == ("PATCH", f"{BASE}/ledger-site-a")
    assert request.query == {"fieldManager": "harmony-agent", "force": "true"}
    assert request.content_type == "application/apply-patch+yaml"
    validate(request.body)
    assert request.body["metadata"]["annotations"] == {"harmony/fencing-token": "7"}

    followed = await b.start_replica(_ctx("site-b"), PrimaryInfo("site-a", "n1", "h", 5432, 7))
    assert followed.ok, followed
    assert fake.requests[-1].body["spec"]["replica"]["primary"] == "ledger-site-a"
    assert (await b.status()).role is Role.REPLICA
    assert (await a.status()).role is Role.PRIMARY

    # Planned switchover to site-b: demote a, carry its token to b, promote b.
    demoted = await a.demote(PrimaryInfo("site-b", "n1", "h", 5432, 9))
    assert demoted.ok, demoted
    body = fake.requests[-1].body
    validate(body)
    assert body["spec"]["replica"]["primary"] == "ledger-site-b"
    assert body["spec"]["bootstrap"] == {  # immutable: a keeps the bootstrap it was made by
        "initdb": {"database": "app", "owner": "app", "dataChecksums": True}
    }
    fake.objects[f"{BASE}/ledger-site-a"]["status"] = {"demotionToken": "eyJzeXN0ZW0i..."}
    token = await a.demotion_token()
    assert token == "eyJzeXN0ZW0i..."
    b.prepare_promotion(token)
    promoted = await b.promote(_ctx("site-b", token=9))
    assert promoted.ok and "demotion token" in promoted.message, promoted
    body = fake.requests[-1].body
    validate(body)
    assert body["spec"]["replica"] == {
        "self": "ledger-site-b",
        "primary": "ledger-site-b",
        "source": "ledger-site-a",
        "promotionToken": "eyJzeXN0ZW0i...",
    }
    assert body["spec"]["bootstrap"] == {"pg_basebackup": {"source": "ledger-site-a"}}
    assert body["metadata"]["annotations"]["harmony/fencing-token"] == "9"
    assert (await b.status()).role is Role.PRIMARY
    assert (await a.status()).role is Role.REPLICA


async def test_stop_hibernates_and_observe_reads_readiness(
    kube: tuple[FakeKube, KubernetesTopology],
) -> None:
    fake, topology = kube
    interpret = _spec().interpret(topology)
    assert (await interpret.observe()).reason == "absent"
    assert (await interpret.start_primary(_ctx("site-a"))).ok
    obj = fake.objects[f"{BASE}/ledger-site-a"]
    obj["status"] = {"phase": "Cluster in healthy state", "readyInstances": 3, "timelineID": 4}
    seen = await interpret.observe()
    assert seen.state is WorkloadState.RUNNING and seen.reason is None, seen
    assert (await interpret.status()).timeline == 4
    stopped = await interpret.stop()
    assert stopped.ok, stopped
    assert fake.requests[-1].body["metadata"]["annotations"]["cnpg.io/hibernation"] == "on"
    assert (await interpret.observe()).state is WorkloadState.STOPPED
    fake.fail_with = 500
    failed = await interpret.start_primary(_ctx("site-a"))
    assert not failed.ok and "HTTP 500" in failed.message
