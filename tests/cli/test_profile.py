"""Connection profiles: flag > environment > context > agent config > default, field by
field; contexts saved, listed, selected and shown; passwords never printed; and a real
nats-server with user/password authorization reached through a context alone."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from agent.cli.profile import (
    DEFAULT_SERVER,
    Profile,
    ProfileError,
    Selection,
    redact,
    resolve,
)
from tests.cli.conftest import Invoke, Mesh
from tests.harness.nats import NatsNode
from tests.harness.wait import eventually


def write_context(home: Path, name: str, **fields: object) -> Path:
    path = home / "harmony-agent" / "contexts" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields))
    return path


def write_config(tmp: Path, **nats: object) -> Path:
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump({"site": "a", "nats": nats}))
    return path


def test_precedence_field_by_field(isolated_profile: Path, tmp_path: Path) -> None:
    home = isolated_profile
    write_context(
        home,
        "prod",
        servers=["nats://ctx:4222"],
        credentials="/ctx.creds",
        tls={"ca_file": "/ctx-ca"},
    )
    config = write_config(
        tmp_path, servers=["nats://cfg:4222"], credentials="/cfg.creds", user="cfg-user"
    )
    env = {"HARMONY_NATS_CREDS": "/env.creds", "HARMONY_AGENT_CONFIG": str(config)}

    # context > config; the config still fills what the context does not set (user)
    p = resolve(Selection(context="prod"), environ={"HARMONY_AGENT_CONFIG": str(config)})
    assert p.servers == ("nats://ctx:4222",) and p.credentials == "/ctx.creds"
    assert p.user == "cfg-user" and p.ca_file == "/ctx-ca"
    assert p.sources["servers"] == "context prod (--context)"
    assert p.sources["user"] == f"config {config}"

    # environment > context
    p = resolve(Selection(context="prod"), environ=env)
    assert p.credentials == "/env.creds" and p.sources["credentials"] == "$HARMONY_NATS_CREDS"
    assert p.servers == ("nats://ctx:4222",)

    # flag > environment
    p = resolve(
        Selection(flags={"servers": "nats://f1:4222,nats://f2:4222", "credentials": "/f"}),
        environ=env,
    )
    assert p.servers == ("nats://f1:4222", "nats://f2:4222") and p.credentials == "/f"
    assert p.sources["servers"] == "--server" and p.sources["credentials"] == "--creds"

    # config alone, then nothing at all
    p = resolve(Selection(), environ={"HARMONY_AGENT_CONFIG": str(config)})
    assert p.servers == ("nats://cfg:4222",) and p.sources["servers"] == f"config {config}"
    p = resolve(Selection(), environ={})
    assert p == Profile(servers=(DEFAULT_SERVER,)) and p.sources["servers"] == "default"


def test_current_context_and_its_selectors(isolated_profile: Path, tmp_path: Path) -> None:
    home = isolated_profile
    write_context(home, "a", servers="nats://a:4222")
    write_context(home, "b", servers="nats://b:4222")
    (home / "harmony-agent" / "context").write_text("a\n")
    assert resolve(Selection(), environ={}).servers == ("nats://a:4222",)
    assert resolve(Selection(), environ={"HARMONY_CONTEXT": "b"}).servers == ("nats://b:4222",)
    assert resolve(Selection(context="b"), environ={"HARMONY_CONTEXT": "a"}).servers == (
        "nats://b:4222",
    )
    # An explicit --config sets the remembered current context aside (not a named one).
    config = write_config(tmp_path, servers=["nats://cfg:4222"])
    assert resolve(Selection(config=str(config)), environ={}).servers == ("nats://cfg:4222",)
    assert resolve(Selection(config=str(config), context="b"), environ={}).servers == (
        "nats://b:4222",
    )


def test_zero_config_agent_file_gives_the_embedded_listen_address(tmp_path: Path) -> None:
    config = write_config(tmp_path, embedded=True, listen="0.0.0.0:14999")
    assert resolve(Selection(config=str(config)), environ={}).servers == ("nats://127.0.0.1:14999",)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("servers: [nats://a:1]\nbogus: 1\n", "bogus: unknown field"),
        ("servers: 5\n", "servers: expected a list of URLs"),
        ("servers: [a:4222]\n", "is not a URL like nats://host:4222"),
        ("tls: {ca: x}\n", "tls.ca: unknown field"),
        ("servers: [nats://a:1\n", "invalid YAML"),
        ("- a\n", "expected a mapping of fields"),
    ],
)
def test_bad_context_files_name_the_file_and_field(
    isolated_profile: Path, content: str, message: str
) -> None:
    path = write_context(isolated_profile, "bad")
    path.write_text(content)
    with pytest.raises(ProfileError, match=message) as info:
        resolve(Selection(context="bad"), environ={})
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_redact() -> None:
    assert redact("nats://op:s3cret@h:4222") == "nats://op:***@h:4222"
    assert redact("nats://h:4222") == "nats://h:4222"
    assert redact("tls://op:s3cret@[::1]:4222") == "tls://op:***@[::1]:4222"


async def test_context_commands(
    invoke: Invoke, mesh: Mesh, isolated_profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_url = mesh.url.replace("nats://", "nats://op:s3cret@")
    saved = await invoke("context", "save", "lab", "-s", secret_url, "--use", "--description", "x")
    assert saved.exit_code == 0, saved.output
    path = isolated_profile / "harmony-agent" / "contexts" / "lab.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert yaml.safe_load(path.read_text())["servers"] == [secret_url]
    assert "current context: lab" in saved.stdout

    listed = await invoke("context", "list")
    assert listed.stdout.startswith("* lab ") and "s3cret" not in listed.stdout
    assert "op:***@" in listed.stdout

    shown = json.loads((await invoke("context", "show")).stdout)
    assert shown["servers"] == [redact(secret_url)]
    assert shown["sources"]["servers"] == "context lab (current context)"
    named = await invoke("context", "show", "lab")
    assert "s3cret" not in named.stdout

    # The environment beats the current context, a flag beats the environment.
    other = "nats://127.0.0.1:1"
    monkeypatch.setenv("HARMONY_NATS_URL", other)
    env_wins = json.loads((await invoke("context", "show")).stdout)
    assert env_wins["servers"] == [other]
    assert env_wins["sources"]["servers"] == "$HARMONY_NATS_URL"
    flag = json.loads((await invoke("context", "show", "-s", mesh.url)).stdout)
    assert flag["servers"] == [mesh.url] and flag["sources"]["servers"] == "--server"
    monkeypatch.delenv("HARMONY_NATS_URL")

    # The context really connects: status through it alone.
    assert (await invoke("status", "-o", "json")).exit_code == 0
    assert (await invoke("context", "use", "-")).stdout == "no current context\n"
    assert json.loads((await invoke("context", "show")).stdout)["sources"]["servers"] == "default"
    assert (await invoke("context", "use", "lab")).exit_code == 0


async def test_a_context_alone_reaches_an_authorizing_server(
    tmp_path: Path, invoke: Invoke, isolated_profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """user + password_file from a context, against a real nats-server that demands them;
    a wrong password is one line that does not contain the password."""
    node = NatsNode(
        name="auth",
        workdir=tmp_path / "nats",
        extra="authorization { user: op, password: s3cret }",
    )
    node.start()
    try:
        await node.wait_ready()
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text("s3cret\n")
        bad.write_text("wrong-pass\n")
        write_context(
            isolated_profile, "auth", servers=[node.url], user="op", password_file=str(good)
        )
        write_context(
            isolated_profile, "nope", servers=[node.url], user="op", password_file=str(bad)
        )

        async def reaches() -> bool:
            r = await invoke("status", "--context", "auth", "-o", "json", "--timeout", "2s")
            # The server has no buckets: reaching it says "mesh not initialised".
            return r.exit_code == 1 and "mesh not initialised" in r.stderr

        await eventually(reaches, timeout=20, what="status through the context")
        refused = await invoke("status", "--context", "nope", "--timeout", "2s")
        assert refused.exit_code == 1 and refused.stderr.count("\n") == 1
        assert "Authorization Violation" in refused.stderr and "wrong-pass" not in refused.stderr
        monkeypatch.setenv("HARMONY_CONTEXT", "auth")
        via_env = await invoke("status", "--timeout", "2s")
        assert "mesh not initialised" in via_env.stderr
    finally:
        node.stop()
