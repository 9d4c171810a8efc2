"""Secrets (issue 11 item 3): a password given by ``nats.password_file``, the system user's
password, a credentials file's seed: none appears in any captured log line, status or
error, whether the connection succeeds or is refused, and even when a bug logs one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from agent.cli import cli
from agent.config import load_config
from agent.logs import configure
from agent.security import SiteSecurity, connection_options, system_password
from mesh.authz import MeshNames as Names
from mesh.authz import Roles, User, render_accounts
from mesh.connection import MeshConnection
from mesh.redact import MASK, redact, redact_value, register
from mesh.tlsfiles import FileProblem, private
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually

PASSWORD = "Tr0ub4dor-and-3-more-words"
WRONG = "n0t-the-Password-at-all"
SEED = "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"


@pytest.fixture
def logs() -> Iterator[None]:
    """``configure`` binds structlog to this test's captured stderr: put it back after."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsNode]:
    users = (User("agent-x", None, password=PASSWORD),)
    node = NatsNode(
        name="pw",
        workdir=tmp_path / "nats",
        extra=render_accounts(Names(stores=("a",)), Roles(site="a", extra_users=users)),
    )
    node.start()
    try:
        await node.wait_ready()
        yield node
    finally:
        node.stop()


def agent_yaml(tmp_path: Path, node: NatsNode, password: str) -> Path:
    pw = tmp_path / f"pw-{len(password)}"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    path = tmp_path / f"agent-{len(password)}.yaml"
    path.write_text(
        f"site: site-a\nnode: n1\nstate_dir: {tmp_path / 'state'}\n"
        f"nats: {{servers: ['{node.url}'], user: agent-x, password_file: '{pw}'}}\n"
    )
    return path


async def test_password_file_never_printed(
    tmp_path: Path, server: NatsNode, capsys: pytest.CaptureFixture[str], logs: None
) -> None:
    configure("debug", "json", site="site-a", node="n1")
    log = structlog.get_logger("test")
    seen: list[str] = []

    def output() -> str:
        out = capsys.readouterr()
        seen.append(out.out + out.err)
        return "".join(seen)

    # Refused: the wrong password from its file; the agent keeps retrying and says why.
    wrong = MeshConnection(connection_options(load_config(agent_yaml(tmp_path, server, WRONG))))
    attempt = asyncio.create_task(wrong.connect())
    await eventually(lambda: "Authorization Violation" in output(), what="the refusal logged")
    attempt.cancel()
    await asyncio.gather(attempt, return_exceptions=True)
    # Accepted: the right password, connected, status, a deliberate "bug" logging it.
    cfg = load_config(agent_yaml(tmp_path, server, PASSWORD))
    conn = MeshConnection(connection_options(cfg))
    await asyncio.wait_for(conn.connect(), 10)
    try:
        assert conn.connected
        log.error("a careless line", password=PASSWORD, url=f"nats://agent-x:{PASSWORD}@h:4222")
        sec = SiteSecurity(cfg, connection=conn, system_password=system_password())
        status = json.dumps(sec.status())
        assert PASSWORD not in status and str(sec.system_password) not in status
    finally:
        await conn.close()
    captured = output() + server.log(100000)
    assert "Authorization Violation" in captured or "authorization" in captured.lower()
    assert "a careless line" in captured and MASK in captured
    for secret in (PASSWORD, WRONG, str(sec.system_password)):
        assert secret not in captured, f"{secret[:4]}... leaked"


def test_cli_errors_mask_url_passwords() -> None:
    result = CliRunner().invoke(
        cli, ["trust", "list", "-s", f"nats://viewer:{PASSWORD}@127.0.0.1:1"]
    )
    assert result.exit_code == 1
    assert PASSWORD not in result.output and "viewer:***@" in result.output


def test_redaction_rules(tmp_path: Path) -> None:
    register("registered-secret-value")
    assert redact("x registered-secret-value y") == f"x {MASK} y"
    assert redact(f"tls://me:{WRONG}@host:4222") == f"tls://me:{MASK}@host:4222"
    assert SEED not in redact(f"creds seed {SEED} here")
    nested = redact_value({"a": ["registered-secret-value", ("ok",)], "b": 1})
    assert nested == {"a": [MASK, ("ok",)], "b": 1}
    creds = tmp_path / "agent.creds"
    creds.write_text(f"-----BEGIN USER NKEY SEED-----\n{SEED}\n------END USER NKEY SEED------\n")
    creds.chmod(0o644)
    with pytest.raises(FileProblem) as err:
        private(creds)
    assert SEED not in str(err.value) and "readable by every user" in str(err.value)
