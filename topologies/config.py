"""How an agent's configuration names its Topology (the ``topology:`` block, CONTRACT section 3).

These are plain data; building the live Topology from them is ``topologies.build``'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalhostConfig(_Strict):
    kind: Literal["localhost"] = "localhost"


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


class KubernetesConfig(_Strict):
    kind: Literal["kubernetes"]
    namespace: str = "default"
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: bool = False


TopologyConfig = Annotated[
    LocalhostConfig | LinuxSshConfig | KubernetesConfig, Field(discriminator="kind")
]
