"""deploy/kubernetes against the official Kubernetes schemas (no cluster is available here)."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.embedded import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
VERSIONS = ["1.32.0", "1.35.0", "1.37.0"]


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


CORE = [(name, doc) for name, doc in documents() if "cert-manager.io" not in doc["apiVersion"]]
CERT_MANAGER = [(n, d) for n, d in documents() if "cert-manager.io" in d["apiVersion"]]


def test_every_kind_the_contract_names_is_shipped() -> None:
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"DaemonSet", "ServiceAccount", "Role", "RoleBinding", "StatefulSet"} <= kinds
    assert {"Issuer", "Certificate"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), CORE, ids=[n for n, _ in CORE])
def test_core_manifest_validates(name: str, doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(("name", "doc"), CERT_MANAGER, ids=[n for n, _ in CERT_MANAGER])
def test_cert_manager_resources_have_required_fields(name: str, doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "cert-manager.io/v1"
    spec = doc["spec"]
    if doc["kind"] == "Issuer":
        assert sum(k in spec for k in ("selfSigned", "ca", "acme", "vault")) == 1
        if "ca" in spec:
            assert spec["ca"]["secretName"]
    else:
        assert spec["secretName"] and spec["issuerRef"]["name"]
        assert spec["privateKey"] == {**spec["privateKey"], "algorithm": "ECDSA", "size": 256}
        if spec.get("isCA"):
            assert spec["duration"] == "87600h"  # 10 years root
        else:
            assert spec["duration"] == "2160h"  # 90 days leaves


def test_daemonset_probes_and_security() -> None:
    ds = next(doc for _, doc in documents() if doc["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def _cert(path: Path) -> None:
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
    (path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "ca-bundle.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_nats_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    cm = next(doc for _, doc in documents() if doc["metadata"]["name"] == "nats-config")
    _cert(tmp_path)
    conf = (
        cm["data"]["nats.conf"]
        .replace("/etc/nats/tls/", f"{tmp_path}/")
        .replace("/etc/nats/bundle/", f"{tmp_path}/")
        .replace("/data/jetstream", str(tmp_path / "js"))
    )
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "POD_NAME": "nats-0"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
