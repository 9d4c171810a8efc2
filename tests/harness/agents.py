"""Real agent processes for tests: ``harmony-agent run`` with a generated config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness.ports import free_port


@dataclass
class AgentProcess:
    """One agent; ``wrap`` runs it inside a network namespace (``Sites.wrap(site)``)."""

    site: str
    node: str
    workdir: Path
    servers: list[str]
    ttl: str = "2s"
    health_host: str = "127.0.0.1"
    health_port: int = field(default_factory=free_port)
    extra: dict[str, Any] = field(default_factory=dict)
    wrap: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def agent_id(self) -> str:
        return f"{self.site}/{self.node}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "agent.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "site": self.site,
            "node": self.node,
            "state_dir": str(self.workdir / "state"),
            "nats": {"servers": self.servers},
            "lease": {"ttl": self.ttl},
            "health": {"listen": f"{self.health_host}:{self.health_port}"},
            "log": {"format": "json", "level": "debug"},
        }
        for key, value in self.extra.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config()))
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "agent.cli", "run", "-c", str(self.config_path)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        # With a netns wrapper the agent is a child of `ip netns exec`, which execs: same pid.
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        if not self.running():
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def http(self, path: str) -> tuple[int, dict[str, Any]]:
        url = f"http://{self.health_host}:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def ready(self) -> bool:
        try:
            return self.http("/readyz")[0] == 200
        except OSError:
            return False

    def not_ready(self) -> bool:
        try:
            return self.http("/readyz")[0] == 503
        except OSError:
            return False

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""
