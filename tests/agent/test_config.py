"""Configuration: every bad field is exit 2 and one line naming it; env beats the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


BAD = [
    ("site: Site_A\n", "site"),
    ("node: n1\n", "site: field required"),
    ("site: a\nnode: 'bad node'\n", "node"),
    ("site: a\nfoo: 1\n", "foo: unknown field"),
    ("site: app\n", "site: 'app' is reserved"),
    ("site: a\nlease: {ttl: soon}\n", "lease.ttl"),
    ("site: a\nlease: {ttl: 100ms}\n", "lease.ttl: must be at least 300ms"),
    ("site: a\nmesh: {replicas: 0}\n", "mesh.replicas"),
    ("site: a\nnats: {servers: [localhost]}\n", "nats.servers"),
    ("site: a\nnats: {tls: {cert_file: /x}}\n", "nats.tls"),
    ("site: a\ntopology: {kind: mainframe}\n", "topology"),
    ("site: a\ntopology: {kind: linux-ssh}\n", "topology.linux-ssh.host"),
    ("site: a\nlog: {level: loud}\n", "log.level"),
    ("site: [a\n", "invalid YAML"),
    ("- a\n- b\n", "expected a mapping"),
]


@pytest.mark.parametrize(("text", "needle"), BAD)
def test_invalid_field_is_named(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    line = str(err.value)
    assert "\n" not in line
    assert needle in line


def test_cli_exit_code_two_and_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "site: a\nlease: {ttl: soon}\n")
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
    assert "lease.ttl" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_env_overrides_win_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "site: site-a\nlease: {ttl: 10s}\nnats: {servers: [nats://x:1]}\n")
    monkeypatch.setenv("HARMONY_AGENT_LEASE__TTL", "1m")
    monkeypatch.setenv("HARMONY_AGENT_SITE", "site-b")
    cfg = load_config(path)
    assert cfg.lease.ttl == 60.0
    assert cfg.site == "site-b"
    assert cfg.nats.servers == ["nats://x:1"]


def test_bad_env_override_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARMONY_AGENT_LEASE__TTL", "whenever")
    with pytest.raises(ConfigError, match=r"HARMONY_AGENT_LEASE__TTL: lease\.ttl"):
        load_config(_write(tmp_path, "site: a\n"))


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARMONY_AGENT_CONFIG", str(_write(tmp_path, "site: from-env\n")))
    assert load_config().site == "from-env"


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("5s", 5.0), ("1m", 60.0), ("7", 7.0), ("2.5", 2.5)]
)
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    cfg = load_config(_write(tmp_path, f"site: a\nlease: {{ttl: '{text}'}}\n"))
    assert cfg.lease.ttl == seconds


def test_zero_config_is_a_local_embedded_site(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("HARMONY_AGENT_"):
            monkeypatch.delenv(key)
    cfg = load_config(None, allow_zero_config=True)
    assert cfg.site == "local"
    assert cfg.nats.embedded is True
    with pytest.raises(ConfigError, match="site: field required"):
        load_config(None)
