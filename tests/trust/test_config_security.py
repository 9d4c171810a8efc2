"""The security fields of the agent configuration: each problem is exit 2 and one line
naming the field; a listener beyond loopback without TLS is refused unless
``nats.insecure: true``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError, load_config
from agent.security import embedded_spec
from mesh.embedded import EmbeddedServer, InsecureListener, ServerSpec
from mesh.trust import SiteCA, cert_pem, create_admin_key, write_private


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca = SiteCA.create("site-a", root / "ca")
    files: dict[str, Path] = {"ca": root / "ca" / "ca.crt"}
    for name in ("nats", "n1"):
        cert, key = ca.issue(name, ips=["127.0.0.1"])
        (root / f"{name}.crt").write_bytes(cert_pem(cert) + cert_pem(ca.cert))
        write_private(root / f"{name}.key", key)
        files[name] = root / f"{name}.crt"
        files[f"{name}-key"] = root / f"{name}.key"
    (root / "password").write_text("correct-horse\n")
    (root / "password").chmod(0o600)
    files["password"] = root / "password"
    files["admin"] = root / "admin"
    files["admin-pub"] = Path(create_admin_key(root / "admin"))
    return files


def secure(pki: dict[str, Path], **nats: object) -> dict[str, object]:
    return {
        "site": "site-a",
        "node": "n1",
        "nats": {
            "embedded": True,
            "listen": "0.0.0.0:4222",
            "server_tls": {
                "cert_file": str(pki["nats"]),
                "key_file": str(pki["nats-key"]),
                "client_ca_file": str(pki["ca"]),
            },
            "accounts": {"stores": ["site-a"]},
            **nats,
        },
    }


def write(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plaintext_listener_beyond_loopback_is_exit_2_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, {"site": "site-a", "nats": {"embedded": True, "listen": "0.0.0.0:4222"}})
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nats.listen: 0.0.0.0:4222 is not loopback" in lines[0]
    assert "nats.insecure" in lines[0]


BAD = [
    ({"nats": {"embedded": True, "cluster_listen": "10.0.0.1:6222"}}, "nats.cluster_listen"),
    ({"nats": {"embedded": True, "monitor_listen": "0.0.0.0:8222"}}, "nats.monitor_listen"),
    ({"nats": {"system_listen": "0.0.0.0:4223"}}, "nats.system_listen"),
    ({"nats": {"servers": ["nats://u:hunter2@10.0.0.1:4222"]}}, "nats.servers: credentials"),
    ({"nats": {"user": "x"}}, "nats: user and password_file"),
    ({"trust": {"bundle_file": "/tmp/b.pem"}}, "trust: bundle_file needs admin_public_key"),
    ({"trust": {"admin_public_key": "rsa:AAAA"}}, "trust.admin_public_key"),
    ({"nats": {"accounts": {"stores": ["s"], "agents": ["Bad/x"]}}}, "nats.accounts.agents"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD)
def test_bad_security_fields(tmp_path: Path, extra: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"site": "site-a", **extra}))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert "hunter2" not in str(err.value)


def test_insecure_allows_plaintext_and_tls_needs_no_switch(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    ok = load_config(
        write(
            tmp_path,
            {"site": "a", "nats": {"embedded": True, "listen": "0.0.0.0:4222", "insecure": True}},
        )
    )
    assert ok.nats.insecure
    data = secure(pki, cluster_listen="0.0.0.0:6222")
    data["nats"]["server_tls"]["route_ca_file"] = str(pki["ca"])  # type: ignore[index]
    cfg = load_config(write(tmp_path, data))
    assert cfg.nats.server_tls is not None


def test_tls_files_are_checked(tmp_path: Path, pki: dict[str, Path]) -> None:
    def error(data: dict[str, object]) -> str:
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, data))
        return str(err.value)

    # A key readable by everyone.
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki["n1-key"].read_bytes())
    loose.chmod(0o644)
    msg = error(
        {"site": "a", "nats": {"tls": {"cert_file": str(pki["n1"]), "key_file": str(loose)}}}
    )
    assert "nats.tls.key_file" in msg and "readable by every user" in msg
    # A key of another certificate.
    msg = error(
        {
            "site": "a",
            "nats": {"tls": {"cert_file": str(pki["n1"]), "key_file": str(pki["nats-key"])}},
        }
    )
    assert "does not match" in msg
    # Missing files, a password file readable by all, route hosts given as IPs.
    assert "no such file" in error({"site": "a", "nats": {"tls": {"ca_file": "/nope.pem"}}})
    open_pw = tmp_path / "pw"
    open_pw.write_text("x\n")
    open_pw.chmod(0o644)
    msg = error({"site": "a", "nats": {"user": "u", "password_file": str(open_pw)}})
    assert "nats.password_file" in msg and "x\n" not in msg
    msg = error(secure(pki, cluster_listen="0.0.0.0:6222", routes=["nats-route://10.0.0.2:6222"]))
    assert "nats.routes" in msg and "DNS names" in msg
    msg = error(secure(pki, cluster_listen="0.0.0.0:6222"))
    assert "route_ca_file is required" in msg
    data = secure(pki)
    del data["nats"]["accounts"]  # type: ignore[attr-defined]
    assert "server_tls needs accounts" in error(data)


def test_embedded_server_refuses_plaintext_too(tmp_path: Path) -> None:
    """Defence in depth: the embedded server itself will not write such a config."""
    server = EmbeddedServer(
        ServerSpec(name="x", store_dir=tmp_path / "js", listen="0.0.0.0:4222"),
        tmp_path / "nats.conf",
    )
    with pytest.raises(InsecureListener, match=r"listen: 0\.0\.0\.0:4222"):
        server.write_config()
    assert not (tmp_path / "nats.conf").exists()


def test_rendered_embedded_config_keeps_secrets_private(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    cfg = load_config(write(tmp_path, {**secure(pki), "state_dir": str(tmp_path / "state")}))
    spec = embedded_spec(cfg, "the-system-password")
    server = EmbeddedServer(spec, tmp_path / "nats" / "nats.conf")
    server.write_config()
    text = (tmp_path / "nats" / "nats.conf").read_text()
    assert "verify_and_map: true" in text and '"CN=n1,OU=site-a,O=harmony"' in text
    assert "the-system-password" in text  # it must be there for the server ...
    assert os.stat(tmp_path / "nats" / "nats.conf").st_mode & 0o077 == 0  # ... and nobody else
    assert spec.system_listen == "127.0.0.1:4223"


async def test_embedded_server_that_cannot_start_does_not_hang_startup(tmp_path: Path) -> None:
    server = EmbeddedServer(
        ServerSpec(name="x", store_dir=tmp_path / "js", listen="0.0.0.0:4222"),
        tmp_path / "nats.conf",
    )
    import asyncio

    task = asyncio.create_task(server.run())
    with pytest.raises(InsecureListener, match=r"^listen: 0\.0\.0\.0:4222 is not loopback"):
        await asyncio.wait_for(server.wait_started(), 5)
    with pytest.raises(InsecureListener):
        await task
