"""How an agent's configuration names its Topology (the ``topology:`` block, CONTRACT section 3).

These are plain data; building the live Topology from them is ``topologies.build``'s job.
Durations are plain seconds here because ``topologies`` may not import ``scores.duration``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalhostConfig(_Strict):
    kind: Literal["localhost"] = "localhost"
    unit_dir: str = "/etc/systemd/system"
    """Where SystemdUnit scores install their unit files."""
    command_timeout: float = Field(default=30.0, gt=0)


class LinuxSshConfig(_Strict):
    kind: Literal["linux-ssh"]
    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "root"
    key_file: Path | None = None
    """Private key; without it asyncssh uses the ssh-agent and the default keys."""
    known_hosts: Path | None = None
    """known_hosts file; None means the user's default. Verification is never switched off."""
    connect_timeout: float = Field(default=10.0, gt=0)
    command_timeout: float = Field(default=30.0, gt=0)
    keepalive_interval: float = Field(default=15.0, ge=0)
    """Seconds between SSH keepalives, so a dead link is noticed on a reused connection."""
    unit_dir: str = "/etc/systemd/system"


class KubernetesConfig(_Strict):
    kind: Literal["kubernetes"]
    namespace: str = "default"
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: bool = False
    request_timeout: float = Field(default=30.0, gt=0)


TopologyConfig = Annotated[
    LocalhostConfig | LinuxSshConfig | KubernetesConfig, Field(discriminator="kind")
]
