"""The container image, built here from Debian packages and wheels, run with podman.

Needs root, podman, runc and debootstrap, and the base root file system already cached by
``make image-base`` (the cold debootstrap stays out of ``make test``; ``.ci/run`` runs it
first). The image itself is rebuilt from the current checkout (``make image``, ~25 s cached).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.harness.nats import NatsNode
from tests.harness.ports import free_port
from tests.harness.wait import eventually

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "deploy" / "image" / "build.sh"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
# What podman needs on these machines (explicit ulimits, or runc cannot set them).
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# A long-running agent, locked down like a restricted Kubernetes pod.
RUN = ["run", "--detach", *LIMITS, "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]

pytestmark = [pytest.mark.image, pytest.mark.timeout(600)]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root for podman and debootstrap (CI runs as root)"
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (.ci/run installs podman runc debootstrap)"
    tarball = subprocess.run(
        [str(BUILD), "base-tarball"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not Path(tarball).is_file():
        return f"base root file system not cached at {tarball}: run `make image-base` first"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = f"localhost/harmony-agent:test-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [str(BUILD), "image"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "IMAGE": tag},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == tag
    yield tag  # type: ignore[misc]
    subprocess.run([*PODMAN, "rmi", "--force", tag], capture_output=True, check=False)


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr}")
    return result


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"harmony-test-{uuid.uuid4().hex[:8]}"
    yield name
    podman("rm", "--force", "--time", "0", name, check=False)


def _logs(name: str) -> str:
    return podman("logs", name, check=False).stderr[-4000:]


def test_image_runs_as_an_unprivileged_user(image: str) -> None:
    once = ["run", "--rm", "--network", "none", *LIMITS]
    out = podman(*once, "--entrypoint", "id", image).stdout
    assert out.startswith("uid=10001(harmony-agent) gid=10001(harmony-agent)"), out
    assert "harmony-agent" in podman(*once, image, "--version").stdout
    assert "nats-server" in podman(*once, "--entrypoint", "nats-server", image, "-v").stdout


async def test_zero_config_agent_becomes_ready_and_stops_cleanly(
    image: str, container_name: str
) -> None:
    """No configuration: site "local" with its embedded nats-server, no network but loopback."""
    podman(*RUN, "--name", container_name, "--network", "none", image)

    def readyz() -> dict[str, Any]:
        out = podman(
            "exec",
            container_name,
            "python3",
            "-c",
            "import urllib.request;"
            "print(urllib.request.urlopen('http://127.0.0.1:9808/readyz').read().decode())",
        ).stdout
        return dict(json.loads(out))

    body = await eventually(readyz, timeout=120, interval=0.5, what="/readyz in the container")
    assert body["in_quorum"] is True, _logs(container_name)
    status = json.loads(
        podman("exec", container_name, "harmony-agent", "status", "-o", "json").stdout
    )
    assert [a["site"] for a in status["agents"]] == ["local"]
    assert status["agents"][0]["healthy"] is True
    # SIGTERM through tini: the agent's graceful stop, exit 0.
    podman("stop", "--time", "60", container_name)
    code = podman("inspect", "--format", "{{.State.ExitCode}}", container_name).stdout.strip()
    assert code == "0", _logs(container_name)


async def test_agent_joins_a_mesh_on_the_host(
    image: str, container_name: str, nats_server: NatsNode, tmp_path: Path
) -> None:
    """A nats-server started by the test; the containerised agent (read-only root file
    system, all capabilities dropped) joins it and writes its heartbeat into the mesh."""
    health = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(
        "site: site-img\n"
        "node: ctr-1\n"
        "state_dir: /var/lib/harmony-agent\n"
        f"nats: {{servers: ['{nats_server.url}']}}\n"
        "mesh: {replicas: 1}\n"
        "lease: {ttl: 3s}\n"
        f"health: {{listen: '127.0.0.1:{health}'}}\n"
    )
    config.chmod(0o644)
    state = tmp_path / "state"  # what an emptyDir is to the pod: writable by uid 10001 only
    state.mkdir(mode=0o700)
    os.chown(state, 10001, 10001)
    podman(
        *RUN,
        "--name",
        container_name,
        "--network",
        "host",
        "--read-only",
        "--volume",
        f"{state}:/var/lib/harmony-agent",
        "--tmpfs",
        "/tmp",
        "--volume",
        f"{config}:/etc/harmony-agent/agent.yaml:ro",
        image,
        "run",
        "--config",
        "/etc/harmony-agent/agent.yaml",
    )

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2) as reply:
            return bool(reply.status == 200)

    await eventually(ready, timeout=120, interval=0.5, what="/readyz of the containerised agent")
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value("harmony-state")
        entry = await kv.get("agent.site-img.ctr-1")
        assert entry.value is not None
        heartbeat = json.loads(entry.value)
        assert heartbeat["site"] == "site-img" and heartbeat["node"] == "ctr-1"
        assert heartbeat["health"]["ready"] is True
    finally:
        await nc.close()
    podman("stop", "--time", "60", container_name)
    code = podman("inspect", "--format", "{{.State.ExitCode}}", container_name).stdout.strip()
    assert code == "0", _logs(container_name)
