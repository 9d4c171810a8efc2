"""How an agent's configuration names its Topology (the ``topology:`` block, CONTRACT section 3).

These are plain data; building the live Topology from them is ``topologies.build``'s job.
Durations are plain seconds here because ``topologies`` may not import ``scores.duration``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def resolve_user(spec: str) -> tuple[int, int]:
    """``user[:group]`` to (uid, gid); ValueError naming what does not exist."""
    import grp
    import pwd

    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise ValueError(f"no such user {user!r}") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise ValueError(f"no such group {group!r}") from None
    return entry.pw_uid, gid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalhostConfig(_Strict):
    kind: Literal["localhost"] = "localhost"
    unit_dir: str = "/etc/systemd/system"
    """Where SystemdUnit scores install their unit files."""
    command_timeout: float | None = Field(default=None, gt=0)
    """Longest a command may take; default min(10 s, lease ttl) (the agent fills it in)."""
    run_as: str | None = None
    """``user`` or ``user:group`` Process workloads run as (never the agent's own user in
    production: a workload must not read the agent's keys). Needs root or CAP_SETUID and
    CAP_SETGID. None: the agent's own user (``harmony-agent check`` warns)."""

    @field_validator("run_as")
    @classmethod
    def _user_exists(cls, value: str | None) -> str | None:
        if value is not None:
            resolve_user(value)
        return value


class LinuxSshConfig(_Strict):
    kind: Literal["linux-ssh"]
    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "root"
    key_file: Path | None = None
    """Private key; without it asyncssh uses the ssh-agent and the default keys."""
    known_hosts: Path | None = None
    """known_hosts file; None means the user's default. Verification is never switched off."""
    connect_timeout: float = Field(default=5.0, gt=0)
    command_timeout: float | None = Field(default=None, gt=0)
    """Longest a command may take; default min(10 s, lease ttl) (the agent fills it in)."""
    keepalive_interval: float = Field(default=15.0, ge=0)
    """Seconds between SSH keepalives, so a dead link is noticed on a reused connection."""
    unit_dir: str = "/etc/systemd/system"


class KubernetesConfig(_Strict):
    kind: Literal["kubernetes"]
    namespace: str = "default"
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: bool = False
    request_timeout: float | None = Field(default=None, gt=0)
    """Longest an API request may take; default min(10 s, lease ttl)."""


TopologyConfig = Annotated[
    LocalhostConfig | LinuxSshConfig | KubernetesConfig, Field(discriminator="kind")
]
