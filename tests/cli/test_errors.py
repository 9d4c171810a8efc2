"""The one-line error guarantee: whatever goes wrong, exactly one line on stderr, starting
``harmony-agent: error:``, no usage block, no traceback, and exit 2 for bad input, 1 for a
runtime failure (3: ``apply --diff`` could not read the mesh).

Every case runs the real console entry point in a subprocess, as an operator would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.ports import free_port

BAD_YAML = "apiVersion: harmony/v1\nkind: Application\nmetadata: {name: x\nspec: {}\n"
GOOD_APP = """\
apiVersion: harmony/v1
kind: Application
metadata: {name: hello}
spec:
  trait: stateful
  placement: {sites: [local]}
  score: {kind: Process, command: [sleep, "60"]}
"""


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections (kernel backlog) but never says a word: a NATS
    client waits for INFO for ever unless the CLI bounds it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"nats://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("HARMONY_", "_HARMONY"))}
    environ["XDG_CONFIG_HOME"] = str(cwd / "xdg")
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=cwd,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def agent_config(tmp: Path, health: str | None = None, **nats: object) -> Path:
    import yaml

    cfg = {
        "site": "edge",
        "node": "n1",
        "state_dir": str(tmp / "state"),
        "health": {"listen": health or f"127.0.0.1:{free_port()}"},
        "nats": {"servers": [f"nats://127.0.0.1:{free_port()}"], **nats},
    }
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == code, (result.returncode, result.stderr, result.stdout)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("harmony-agent: error: "), lines[0]
    assert "Traceback" not in result.stderr and "Usage:" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


BAD_INPUT = [
    (["nope"], "no such command 'nope'"),
    (["cmd", "failover"], "cmd failover: missing argument 'APP'"),
    (["cmd", "frobnicate"], "no such command 'frobnicate'"),
    (["status", "--bogus"], "no such option '--bogus'"),
    (["status", "-o", "xml"], "'xml' is not one of"),
    (["status", "--timeout", "soon"], "--timeout: invalid duration 'soon'"),
    (["status", "--timeout", "0s"], "--timeout: must be positive"),
    (["cmd", "drain", "Site_B"], "SITE: 'Site_B' is not a valid name"),
    (["cmd", "ping", "--via", "nodeless"], "--via node"),
    (["cmd", "failover", "ledger", "--to", "x y"], "--to: 'x y' is not a valid name"),
    (["apply", "-f", "missing.yaml"], "missing.yaml: cannot read"),
    (["apply", "-f", "bad.yaml"], "bad.yaml:4:5: invalid YAML"),
    (["check", "-f", "bad.yaml"], "bad.yaml:4:5: invalid YAML"),
    (["delete", "Bad_Name"], "not a valid application name"),
    (["get", "app", "Bad_Name"], "not a valid application name"),
    (["logs", "hello", "--site", "Bad/x"], "--site: 'Bad/x' is not SITE or SITE/NODE"),
    (["logs", "hello", "--tail", "-1"], "--tail"),
    (["agent", "forget", "nonsense"], "is not an agent id"),
    (["events", "--since", "yesterday"], "--since: invalid duration"),
    (["events", "--app", "A.B"], "--app: 'A.B' is not a valid application name"),
    (["completion", "tcsh"], "'tcsh' is not one of"),
    (["trust", "add", "missing.pem"], "missing.pem"),
    (["status", "--context", "nope"], "context 'nope' not found"),
    (["context", "use", "nope"], "context 'nope' not found"),
    (["context", "save", "../evil"], "context name '../evil' is not valid"),
    (["status", "--config", "missing.yaml"], "config missing.yaml: cannot read"),
    (["status", "-s", "localhost:4222"], "is not a URL like nats://host:4222"),
    (["run", "-c", "bad.yaml"], "bad.yaml:4:5: invalid YAML"),
    (["run", "-c", "unknown-field.yaml"], "bogus: unknown field"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "unknown-field.yaml").write_text("site: a\nbogus: 1\n")
    assert_one_line(run_cli(*args, cwd=tmp_path), 2, needle)


def trust_admin(tmp_path: Path) -> dict[str, list[str]]:
    """Signing and verifying options for the trust verbs (signed entries, issue 12)."""
    from mesh.trust import create_admin_key

    public = create_admin_key(tmp_path / "trust-admin")
    return {
        "list": [],
        "bundle": ["--admin-public-key", public],
        "revoke": ["--admin-key", str(tmp_path / "trust-admin" / "trust-admin.key")],
    }


def test_unreachable_mesh_is_one_line_exit_1(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    (tmp_path / "app.yaml").write_text(GOOD_APP)
    keys = trust_admin(tmp_path)
    for args in (
        ["status"],
        ["cmd", "ping"],
        ["cmd", "failover", "hello"],
        ["apply", "-f", "app.yaml"],
        ["delete", "hello"],
        ["get", "app", "hello"],
        ["events"],
        ["logs", "hello"],
        ["agent", "forget", "site-a/n1"],
        ["trust", "list"],
        ["trust", "bundle", *keys["bundle"]],
        ["trust", "revoke", "site-a", *keys["revoke"]],
    ):
        result = run_cli(*args, "-s", url, "--timeout", "1s", cwd=tmp_path)
        assert_one_line(result, 1, f"mesh unreachable at {url}")


@pytest.mark.parametrize("verb", ["list", "bundle", "revoke site-a"])
def test_trust_against_a_silent_server_honours_timeout(
    tmp_path: Path, silent_server: str, verb: str
) -> None:
    """The case that used to hang for ever: a server that accepts and never answers."""
    keys = trust_admin(tmp_path)[verb.split(maxsplit=1)[0]]
    result = run_cli(
        "trust", *verb.split(), *keys, "-s", silent_server, "--timeout", "1s", cwd=tmp_path
    )
    assert_one_line(result, 1, "mesh unreachable", "(timeout 1s)")


def test_apply_diff_mesh_failure_is_exit_3(tmp_path: Path) -> None:
    (tmp_path / "app.yaml").write_text(GOOD_APP)
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_cli(
        "apply", "-f", "app.yaml", "--diff", "-s", url, "--timeout", "1s", cwd=tmp_path
    )
    assert_one_line(result, 3, "mesh unreachable")


def test_health_port_in_use_is_one_line_exit_2(tmp_path: Path, busy_port: int) -> None:
    config = agent_config(tmp_path, health=f"127.0.0.1:{busy_port}")
    result = run_cli("run", "-c", str(config), cwd=tmp_path)
    assert_one_line(result, 2, f"health endpoint 127.0.0.1:{busy_port}", "address already in use")


def test_embedded_port_in_use_is_one_line_exit_2(tmp_path: Path, busy_port: int) -> None:
    """Issue 15 item 4: the embedded server owns its port, or the agent does not start
    (it must never join whatever else listens there)."""
    config = agent_config(
        tmp_path,
        embedded=True,
        listen=f"127.0.0.1:{busy_port}",
        monitor_listen=f"127.0.0.1:{free_port()}",
    )
    result = run_cli("run", "-c", str(config), cwd=tmp_path)
    assert_one_line(result, 2, f"embedded nats-server 127.0.0.1:{busy_port}", "in use")


def test_internal_errors_are_one_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is still one line and exit 1; HARMONY_DEBUG=1 lets the traceback through."""
    import click
    from click.testing import CliRunner

    from agent.cli.group import HarmonyGroup

    @click.group(cls=HarmonyGroup)
    def root() -> None:
        pass

    @root.command()
    def boom() -> None:
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.delenv("HARMONY_DEBUG", raising=False)
    result = CliRunner().invoke(root, ["boom"])
    assert result.exit_code == 1
    assert result.stderr == (
        "harmony-agent: error: internal error: RuntimeError: a bug "
        "(run with HARMONY_DEBUG=1 for the traceback)\n"
    )
    monkeypatch.setenv("HARMONY_DEBUG", "1")
    debug = CliRunner().invoke(root, ["boom"])
    assert isinstance(debug.exception, RuntimeError)


async def test_health_endpoint_bind_failure_is_one_line(busy_port: int) -> None:
    """The race ``run``'s check cannot close (the port taken between check and bind) ends
    the same way: ``ListenError`` with one line, which ``run`` turns into exit 2."""
    from agent.health import HealthServer, ListenError

    server = HealthServer(
        f"127.0.0.1:{busy_port}", liveness=lambda: (True, {}), readiness=lambda: (True, {})
    )
    with pytest.raises(ListenError) as info:
        await server.start()
    assert str(info.value) == (
        f"health endpoint 127.0.0.1:{busy_port}: cannot listen: address already in use"
    )
