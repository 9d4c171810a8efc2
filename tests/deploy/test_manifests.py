"""`harmony-agent manifests`: generated Kubernetes objects against the official schemas, the
generated NATS configs against a real nats-server, and the examples against drift.

No Kubernetes API server runs here: objects are validated with kubernetes-validate (strict,
several Kubernetes versions); cert-manager resources (CRDs, not packaged offline) are checked
for the fields cert-manager v1 requires.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.cli import cli
from agent.config import AgentConfig, load_config
from agent.deploy.budget import shutdown_budget
from agent.deploy.site import Peer, SiteSpec, generate, to_yaml
from mesh.embedded import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "kubernetes").glob("example-*.yaml"))
VERSIONS = ["1.32.0", "1.35.0", "1.37.0"]

# Generator inputs beyond the examples: one node, no peers, other namespaces, NodePort.
SPECS = {
    "lonely-edge": SiteSpec(site="edge-7", nodes=("box",), nats_replicas=1),
    "custom-namespaces": SiteSpec(
        site="dc-2",
        nodes=("ip-10-0-1-23.eu-west-1.compute.internal", "worker-02.corp.example"),
        peers=(Peer("dc-1", "nats-0.dc-1.example", 7222), Peer("dc-3", "203.0.113.7")),
        peer_cidrs=("198.51.100.0/24", "203.0.113.0/24"),
        client_cidrs=("192.0.2.0/24",),
        external_domain="dc-2.example",
        namespace="apps",
        system_namespace="mesh",
        ca_namespace="pki",
        route_service_type="NodePort",
        max_stop_timeout=120,
        operators=("bob", "carol"),
        storage_class="fast",
    ),
}


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _example_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in EXAMPLES:
        for doc in _documents(path.read_text()):
            out.append((f"{path.stem}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def _spec_docs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{label}:{r.kind}/{r.metadata.name}", r.dump())
        for label, spec in SPECS.items()
        for r in generate(spec)
    ]


ALL = _example_docs() + _spec_docs()
CORE = [(n, d) for n, d in ALL if "cert-manager.io" not in d["apiVersion"]]
CERT_MANAGER = [(n, d) for n, d in ALL if "cert-manager.io" in d["apiVersion"]]


def _find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"]))


def test_three_examples_are_shipped() -> None:
    assert [p.stem for p in EXAMPLES] == ["example-frankfurt", "example-london", "example-paris"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_what_the_generator_makes(path: Path) -> None:
    """The first line of each example is its command: re-run it, compare byte for byte."""
    first, _, body = path.read_text().split("\n", 2)
    assert first.startswith("# harmony-agent manifests ")
    args = shlex.split(first.removeprefix("# harmony-agent "))
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output == body, (
        f"{path.name} drifted from the generator: run deploy/kubernetes/generate-examples.sh"
    )


def test_every_kind_is_generated() -> None:
    kinds = {d["kind"] for _, d in ALL}
    assert {
        "Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "DaemonSet",
        "StatefulSet", "Service", "PodDisruptionBudget", "NetworkPolicy",
        "Issuer", "ClusterIssuer", "Certificate",
    } <= kinds  # fmt: skip


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), CORE, ids=[n for n, _ in CORE])
def test_core_object_validates(name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_can_fail() -> None:
    ds = _find([d for _, d in CORE], "DaemonSet")
    broken = yaml.safe_load(yaml.safe_dump(ds))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGets"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


@pytest.mark.parametrize(("name", "doc"), CERT_MANAGER, ids=[n for n, _ in CERT_MANAGER])
def test_cert_manager_resources_have_required_fields(name: str, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "cert-manager.io/v1"
    spec = doc["spec"]
    if doc["kind"] in ("Issuer", "ClusterIssuer"):
        assert sum(k in spec for k in ("selfSigned", "ca", "acme", "vault")) == 1
        if "ca" in spec:
            assert spec["ca"]["secretName"]
        assert ("namespace" in doc["metadata"]) == (doc["kind"] == "Issuer")
        return
    assert spec["secretName"] and spec["issuerRef"]["name"]
    assert spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
    assert spec["privateKey"] == {**spec["privateKey"], "algorithm": "ECDSA", "size": 256}
    # The agent requires an OU naming the site on every CA and leaf (mesh/trust.py).
    assert len(spec["subject"]["organizationalUnits"]) == 1
    if spec.get("isCA"):
        assert spec["duration"] == "87600h"  # 10 years root
    else:
        assert spec["duration"] == "2160h"  # 90 days leaves
        assert spec["usages"]


@pytest.mark.parametrize("label", sorted(SPECS))
def test_namespaces_are_separate_and_restricted(label: str) -> None:
    spec = SPECS[label]
    docs = [r.dump() for r in generate(spec)]
    namespaces = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Namespace"}
    assert set(namespaces) == {spec.namespace, spec.system_namespace}
    for ns in namespaces.values():
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert _find(docs, "DaemonSet")["metadata"]["namespace"] == spec.namespace
    assert _find(docs, "StatefulSet")["metadata"]["namespace"] == spec.system_namespace
    root = next(d for d in docs if d["kind"] == "Certificate" and d["spec"].get("isCA"))
    assert root["metadata"]["namespace"] == spec.ca_namespace
    assert root["spec"]["subject"]["organizationalUnits"] == [spec.site]


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc["spec"]["template"]["spec"])


@pytest.mark.parametrize("label", sorted(SPECS))
def test_pods_meet_pod_security_restricted(label: str) -> None:
    docs = [r.dump() for r in generate(SPECS[label])]
    for kind in ("DaemonSet", "StatefulSet"):
        pod = _pod(_find(docs, kind))
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"] + pod.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["readOnlyRootFilesystem"] is True
        assert not any("hostPath" in v for v in pod["volumes"])


def test_node_name_is_derived_not_raw() -> None:
    docs = [r.dump() for r in generate(SPECS["custom-namespaces"])]
    container = _pod(_find(docs, "DaemonSet"))["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert "HARMONY_AGENT_NODE" not in env
    assert env["HARMONY_NODE_HOSTNAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    agent_certs = {
        d["metadata"]["name"]: d["spec"]["emailAddresses"]
        for d in docs
        if d["kind"] == "Certificate" and d["metadata"]["name"].startswith("harmony-agent-")
    }
    # Kubernetes node names are DNS names: the agent's node is their first label.
    assert agent_certs == {
        "harmony-agent-ip-10-0-1-23": ["ip-10-0-1-23@agent.dc-2.harmony"],
        "harmony-agent-worker-02": ["worker-02@agent.dc-2.harmony"],
    }


def test_the_generated_agent_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the agent container sees: the ConfigMap file plus the DaemonSet's environment."""
    spec = SPECS["custom-namespaces"]
    docs = [r.dump() for r in generate(spec)]
    cm = _find(docs, "ConfigMap", "harmony-agent")
    path = tmp_path / "agent.yaml"
    path.write_text(cm["data"]["agent.yaml"])
    container = _pod(_find(docs, "DaemonSet"))["containers"][0]
    hostname = "ip-10-0-1-23.eu-west-1.compute.internal"
    for env in container["env"]:
        value = env.get("value") or hostname  # spec.nodeName
        monkeypatch.setenv(env["name"], value.replace("$(HARMONY_NODE_HOSTNAME)", hostname))
    # The certificate files exist only in the pod: check the fields, not the files.
    config: AgentConfig = load_config(path, check_files=False)
    assert config.site == "dc-2" and config.node == "ip-10-0-1-23"
    assert config.topology.kind == "kubernetes" and config.topology.namespace == "apps"
    assert config.nats.tls is not None
    assert str(config.nats.tls.cert_file) == f"/etc/harmony-agent/tls/{hostname}/tls.crt"
    assert all(s.startswith("tls://nats-") for s in config.nats.servers)
    # The projected volume puts this node's certificate exactly there.
    tls = next(v for v in _pod(_find(docs, "DaemonSet"))["volumes"] if v["name"] == "tls")
    paths = {i["path"] for s in tls["projected"]["sources"] for i in s["secret"]["items"]}
    assert f"{hostname}/tls.crt" in paths


@pytest.mark.parametrize("label", sorted(SPECS))
def test_grace_period_covers_the_shutdown_budget(label: str) -> None:
    spec = SPECS[label]
    pod = _pod(_find([r.dump() for r in generate(spec)], "DaemonSet"))
    assert pod["terminationGracePeriodSeconds"] == shutdown_budget(spec.max_stop_timeout)
    assert pod["terminationGracePeriodSeconds"] >= spec.max_stop_timeout + 15


def test_agent_rbac_covers_what_scores_scale_and_nothing_outside_its_namespace() -> None:
    spec = SPECS["custom-namespaces"]
    docs = [r.dump() for r in generate(spec)]
    role = _find(docs, "Role", "harmony-agent")
    assert role["metadata"]["namespace"] == spec.namespace
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for resource in ("deployments", "statefulsets", "replicasets"):
        assert ("apps", resource, "patch") in granted
        assert ("apps", f"{resource}/scale", "patch") in granted
    for resource in ("pods", "pods/status"):
        assert {("", resource, v) for v in ("get", "list", "watch")} <= granted
    assert not [g for g in granted if g[1] in ("secrets", "pods/exec", "*")]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    bundle_role = _find(docs, "Role", "harmony-agent-trust-bundle")
    assert bundle_role["metadata"]["namespace"] == spec.system_namespace
    assert bundle_role["rules"][0]["resourceNames"] == ["harmony-trust-bundle"]


def test_nats_statefulset_pdb_anti_affinity_and_reloader() -> None:
    docs = [r.dump() for r in generate(SPECS["custom-namespaces"])]
    sts = _find(docs, "StatefulSet")
    pod = _pod(sts)
    term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term[0]["topologyKey"] == "kubernetes.io/hostname"
    assert _find(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert [c["name"] for c in pod["containers"]] == ["nats", "reloader"]
    assert pod["shareProcessNamespace"] is True
    bundle = next(v for v in pod["volumes"] if v["name"] == "bundle")
    assert bundle["configMap"] == {"name": "harmony-trust-bundle", "optional": True}
    cm = _find(docs, "ConfigMap", "harmony-trust-bundle")
    assert "data" not in cm  # written by the agent; re-applying must not wipe it
    assert cm["metadata"]["annotations"]["harmony.io/written-by"] == "harmony-agent"


def test_network_policy_clients_from_the_agent_namespace_routes_from_peers() -> None:
    spec = SPECS["custom-namespaces"]
    docs = [r.dump() for r in generate(spec)]
    policy = _find(docs, "NetworkPolicy")
    rules = {r["ports"][0]["port"]: r["from"] for r in policy["spec"]["ingress"]}
    assert set(rules) == {4222, 6222}  # nothing for monitoring
    agent_ns = rules[4222][0]["namespaceSelector"]["matchLabels"]
    assert agent_ns == {"kubernetes.io/metadata.name": spec.namespace}
    route_cidrs = {p["ipBlock"]["cidr"] for p in rules[6222] if "ipBlock" in p}
    assert route_cidrs == set(spec.peer_cidrs)
    # Peers reach each pod through its own Service, which keeps their source address.
    routes = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] != "nats"]
    assert len(routes) == spec.nats_replicas
    assert {r["spec"]["externalTrafficPolicy"] for r in routes} == {"Local"}


def _nats_conf(doc: dict[str, Any]) -> str:
    return str(doc["data"]["nats.conf"])


NATS_CONFIGS = [
    (n, d) for n, d in ALL if d["kind"] == "ConfigMap" and "nats.conf" in d.get("data", {})
]


@pytest.mark.parametrize(("name", "doc"), NATS_CONFIGS, ids=[n for n, _ in NATS_CONFIGS])
def test_nats_config_semantics(name: str, doc: dict[str, Any]) -> None:
    conf = _nats_conf(doc)
    site = re.search(r'server_tags: \["site:([a-z0-9-]+)"\]', conf)
    assert site, conf[:500]
    assert 'http: "127.0.0.1:8222"' in conf
    assert "verify_and_map: true" in conf
    if "cluster {" in conf:  # a lone server without peers runs non-clustered
        assert "verify_cert_and_check_known_urls: true" in conf
        assert "no_advertise: true" in conf
    else:
        assert name.startswith("lonely-edge")
    assert "sync_interval: always" in conf and 'unique_tag: "site:"' in conf
    assert "server_name: $SERVER_NAME" in conf
    # One user per agent, and agents may publish only keys naming themselves.
    users = re.findall(r'user: "([^"]+)@agent\.' + site.group(1) + r'\.harmony"', conf)
    assert users and len(users) == len(set(users))


def _self_signed(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    for file in ("tls.crt", "ca.crt", "ca.pem"):
        (path / file).write_bytes(pem)
    (path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _nats_test(conf: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    _self_signed(tmp_path)
    local = (
        conf.replace("/etc/nats/tls/", f"{tmp_path}/")
        .replace("/etc/nats/run/", f"{tmp_path}/")
        .replace("/data/jetstream", str(tmp_path / "js"))
    )
    path = tmp_path / "nats.conf"
    path.write_text(local)
    return subprocess.run(
        [find_nats_server(), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "SERVER_NAME": "site-nats-0"},
        check=False,
    )


@pytest.mark.parametrize(("name", "doc"), NATS_CONFIGS, ids=[n for n, _ in NATS_CONFIGS])
def test_nats_config_is_accepted_by_nats_server(
    name: str, doc: dict[str, Any], tmp_path: Path
) -> None:
    result = _nats_test(_nats_conf(doc), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nats_config_check_can_fail(tmp_path: Path) -> None:
    conf = _nats_conf(NATS_CONFIGS[0][1]).replace("verify_and_map: true", "verify_and_mapp: 1")
    assert _nats_test(conf, tmp_path).returncode != 0


def test_no_site_is_hard_coded() -> None:
    """A site's name appears only where it was given: nothing of 'site-a' survives anywhere."""
    for path in [*ROOT.joinpath("deploy").rglob("*"), *ROOT.joinpath("agent", "deploy").rglob("*")]:
        if path.is_file() and path.suffix in (".yaml", ".py", ".sh", ".conf", ".md"):
            assert "site-a" not in path.read_text(), path
    text = to_yaml(generate(SiteSpec(site="zz-9", nodes=("n1",))))
    assert "zz-9" in text
    for other in ("paris", "frankfurt", "london", "site-a"):
        assert other not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site", "paris"], "missing option '--nodes'"),
        (["--site", "Paris", "--nodes", "n1"], "--site"),
        (["--site", "paris", "--nodes", "n1", "--peers", "frankfurt"], "SITE=HOST[:PORT]"),
        (["--site", "paris", "--nodes", "n1", "--peers", "x=h:1"], "--external-domain"),
        (["--site", "paris", "--nodes", "a.x,a.y"], "same agent node name"),
        (["--site", "paris", "--nodes", "n1", "--namespace", "harmony-system"], "three"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["manifests", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
