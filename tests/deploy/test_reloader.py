"""The NATS pod's reloader script against a real nats-server with real site CAs.

Same script as in the generated ConfigMap (agent/deploy/reloader.py), the pod's paths moved
into a temporary directory. A client of another site is refused until that site's CA enters
the trust bundle; the reloader notices, rewrites ca.pem and reloads nats-server, and the
client is accepted; removing the CA again (a revoke) locks it out again.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from agent.deploy.reloader import SCRIPT
from mesh.embedded import find_nats_server
from mesh.trust import SiteCA, cert_pem
from tests.harness.ports import free_port
from tests.harness.wait import eventually


def _write(path: Path, data: bytes) -> None:
    """Replace a file at once, as the kubelet swaps a ConfigMap volume."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


class Pod:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tls, self.bundle, self.run = root / "tls", root / "bundle", root / "run"
        for d in (self.tls, self.bundle, self.run):
            d.mkdir()
        self.env = {
            **os.environ,
            "TLS_DIR": str(self.tls),
            "BUNDLE_DIR": str(self.bundle),
            "RUN_DIR": str(self.run),
            "RELOAD_INTERVAL": "0.2",
            "PATH": f"{Path(find_nats_server()).parent}:{os.environ['PATH']}",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def reloader(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / "reloader.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            ["sh", "-c", SCRIPT, "reloader.sh", *args], env=self.env, stdout=log, stderr=log
        )
        log.close()
        self.procs.append(proc)
        return proc

    def nats_server(self, port: int) -> None:
        conf = self.root / "nats.conf"
        conf.write_text(
            f'listen: "127.0.0.1:{port}"\n'
            f'pid_file: "{self.run}/nats.pid"\n'
            "tls {\n"
            f'  cert_file: "{self.tls}/tls.crt"\n'
            f'  key_file: "{self.tls}/tls.key"\n'
            f'  ca_file: "{self.run}/ca.pem"\n'
            "  verify: true\n"
            "}\n"
        )
        log = open(self.root / "nats.log", "ab")  # noqa: SIM115 - owned by the process
        self.procs.append(
            subprocess.Popen([find_nats_server(), "-c", str(conf)], stdout=log, stderr=log)
        )
        log.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    pod = Pod(tmp_path)
    try:
        yield pod
    finally:
        pod.stop()


async def test_bundle_change_reloads_nats_server(pod: Pod, tmp_path: Path) -> None:
    paris = SiteCA.create("paris", tmp_path / "ca-paris")
    london = SiteCA.create("london", tmp_path / "ca-london")
    server, server_key = paris.issue("nats-0", ips=["127.0.0.1"])
    (pod.tls / "tls.crt").write_bytes(cert_pem(server))
    (pod.tls / "tls.key").write_bytes(server_key)
    (pod.tls / "ca.crt").write_bytes(cert_pem(paris.cert))
    _write(pod.bundle / "ca-bundle.pem", cert_pem(paris.cert))  # as the agent writes it
    client, client_key = london.issue("london-agent")
    (tmp_path / "client.crt").write_bytes(cert_pem(client))
    (tmp_path / "client.key").write_bytes(client_key)

    assert pod.reloader("--once").wait(timeout=30) == 0  # the init container
    assert (pod.run / "ca.pem").read_bytes() == cert_pem(paris.cert) * 2
    port = free_port()
    pod.nats_server(port)
    pod.reloader()

    async def london_connects() -> bool:
        ctx = ssl.create_default_context(cafile=str(pod.tls / "ca.crt"))
        ctx.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
        try:
            nc = await nats.connect(
                f"tls://127.0.0.1:{port}",
                tls=ctx,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
            )
        except Exception:
            return False
        await nc.close()
        return True

    async def nats_up() -> bool:
        return (pod.run / "nats.pid").exists()

    await eventually(nats_up, timeout=30, what="nats-server started")
    assert not await london_connects()  # london's CA is not trusted yet

    _write(pod.bundle / "ca-bundle.pem", cert_pem(paris.cert) + cert_pem(london.cert))
    await eventually(london_connects, timeout=30, interval=0.2, what="london accepted")
    assert cert_pem(london.cert) in (pod.run / "ca.pem").read_bytes()
    assert "nats-server reloaded" in (tmp_path / "reloader.log").read_text()

    _write(pod.bundle / "ca-bundle.pem", cert_pem(paris.cert))  # trust revoke london

    async def london_refused() -> bool:
        return not await london_connects()

    await eventually(london_refused, timeout=30, interval=0.2, what="london refused again")
