"""Kubernetes: the agent writes the trust bundle into the NATS pods' ConfigMap (issue 12
item 2), and the generated RBAC lets it do exactly that.

No Kubernetes API server can run here: the requests go to ``fake_kube``, an in-process
stand-in that records their shape (method, path, content type, body), as the other
Kubernetes tests do. The trust entries are real signed entries in a real nats-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from agent.config import AgentConfig
from agent.deploy.site import BUNDLE_CONFIGMAP, SiteSpec, generate
from agent.security import BUNDLE_KEY, SiteSecurity
from mesh.trust import SiteCA, admin_public_key_string, cert_pem, sign_entry
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually
from tests.scores.fake_kube import FakeKube, fake_kube
from topologies.k8s import KubernetesTopology

PATH = f"/api/v1/namespaces/harmony-system/configmaps/{BUNDLE_CONFIGMAP}"


@pytest.fixture
async def trust_kv(nats_server: NatsNode) -> AsyncIterator[KeyValue]:
    nc = await nats.connect(servers=[nats_server.url])
    try:
        yield await nc.jetstream().create_key_value(KeyValueConfig(bucket="harmony-trust"))
    finally:
        await nc.close()


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with fake_kube() as fake:
        # The manifests create the ConfigMap empty; the agent only patches it.
        fake.objects[PATH] = {"metadata": {"name": BUNDLE_CONFIGMAP}}
        yield fake


def patches(fake: FakeKube) -> list[str]:
    """The bundle of each PATCH of the ConfigMap, checking each request's shape."""
    out = []
    for r in fake.requests:
        if r.method == "PATCH" and r.path == PATH:
            assert r.content_type == "application/merge-patch+json"
            assert set(r.body) == {"data"} and set(r.body["data"]) == {BUNDLE_KEY}
            out.append(r.body["data"][BUNDLE_KEY])
    return out


async def test_the_agent_writes_the_bundle_configmap(
    tmp_path: Path, trust_kv: KeyValue, kube: FakeKube
) -> None:
    admin = ed25519.Ed25519PrivateKey.generate()
    cas = {s: SiteCA.create(s, tmp_path / s) for s in ("site-a", "site-b")}
    for site, ca in cas.items():
        await trust_kv.put(f"ca.{site}", sign_entry(site, ca.cert, admin, 1))
    config = AgentConfig(
        site="site-a",
        node="n1",
        state_dir=tmp_path / "state",
        trust={
            "bundle_file": tmp_path / "state" / "trust" / "ca-bundle.pem",
            "admin_public_key": admin_public_key_string(admin.public_key()),
            "bundle_configmap": f"harmony-system/{BUNDLE_CONFIGMAP}",
        },
    )
    topology = KubernetesTopology(kube.url, namespace="harmony")
    security = SiteSecurity(config)
    security.kube = topology
    task = asyncio.create_task(security.run_trust_sync(trust_kv))
    renewer = asyncio.create_task(security.renew_forever())
    try:
        await eventually(lambda: len(patches(kube)) == 1, what="the first bundle written")
        [first] = patches(kube)
        assert first == config.trust.bundle_file.read_text()  # type: ignore[union-attr]
        assert all(cert_pem(ca.cert).decode() in first for ca in cas.values())

        # A revoke reaches the ConfigMap (the NATS pods' reloader takes it from there).
        await trust_kv.put("ca.site-b", sign_entry("site-b", None, admin, 2))
        await eventually(lambda: len(patches(kube)) == 2, what="the bundle without site-b")
        second = patches(kube)[-1]
        assert cert_pem(cas["site-b"].cert).decode() not in second
        assert cert_pem(cas["site-a"].cert).decode() in second

        # The API server refusing is reported, never fatal, and retried until it works.
        kube.fail_with = 403
        await trust_kv.put("ca.site-b", sign_entry("site-b", cas["site-b"].cert, admin, 3))
        await eventually(
            lambda: security.configmap_problem is not None, what="the refusal reported"
        )
        assert "HTTP 403" in (security.status()["security"]["bundle_configmap_problem"] or "")
        assert not task.done()
        kube.fail_with = None
        await eventually(lambda: security.configmap_problem is None, timeout=40, what="the retry")
        assert cert_pem(cas["site-b"].cert).decode() in patches(kube)[-1]
    finally:
        for t in (task, renewer):
            t.cancel()
        await asyncio.gather(task, renewer, return_exceptions=True)
        await topology.close()


def test_generated_rbac_and_config_allow_exactly_that_write() -> None:
    spec = SiteSpec(
        site="paris",
        nodes=("n1",),
        nats_replicas=1,
        trust_admin_public_key=admin_public_key_string(
            ed25519.Ed25519PrivateKey.generate().public_key()
        ),
    )
    docs = [r.dump() for r in generate(spec)]
    roles = [
        d
        for d in docs
        if d["kind"] == "Role" and d["metadata"]["namespace"] == spec.system_namespace
    ]
    [rule] = [r for role in roles for r in role["rules"] if "configmaps" in r["resources"]]
    assert rule["resourceNames"] == [BUNDLE_CONFIGMAP] and "patch" in rule["verbs"]
    assert "create" not in rule["verbs"] and "delete" not in rule["verbs"]
    bindings = [
        d
        for d in docs
        if d["kind"] == "RoleBinding"
        and d["roleRef"]["name"] in {r["metadata"]["name"] for r in roles}
    ]
    assert [s["namespace"] for b in bindings for s in b["subjects"]] == [spec.namespace]
    configmaps = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in docs
        if d["kind"] == "ConfigMap"
    }
    assert (spec.system_namespace, BUNDLE_CONFIGMAP) in configmaps
    agent_yaml = next(
        d["data"]["agent.yaml"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "harmony-agent"
    )
    assert f"bundle_configmap: {spec.system_namespace}/{BUNDLE_CONFIGMAP}" in agent_yaml
