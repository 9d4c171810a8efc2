"""From the ``topology:`` block of the agent configuration to a live Topology."""

from __future__ import annotations

from topologies.base import Topology
from topologies.config import KubernetesConfig, LinuxSshConfig, LocalhostConfig, TopologyConfig


def topology_class(config: TopologyConfig) -> type[Topology]:
    """The class a config builds, without building it (no SSH, no kubeconfig needed)."""
    if isinstance(config, LocalhostConfig):
        from topologies.localhost import LocalhostTopology

        return LocalhostTopology
    if isinstance(config, LinuxSshConfig):
        from topologies.ssh import LinuxSshTopology

        return LinuxSshTopology
    from topologies.k8s import KubernetesTopology

    return KubernetesTopology


def capabilities_of(config: TopologyConfig) -> frozenset[type]:
    """What a topology built from ``config`` will provide; used by ``harmony-agent check``."""
    caps: frozenset[type] = topology_class(config).CAPABILITIES  # type: ignore[attr-defined]
    return caps


def build_topology(config: TopologyConfig) -> Topology:
    """Build the topology; connections (SSH, HTTP) are opened on first use, not here."""
    if isinstance(config, LocalhostConfig):
        from topologies.config import resolve_user
        from topologies.localhost import LocalhostTopology

        uid, gid = resolve_user(config.run_as) if config.run_as else (None, None)
        return LocalhostTopology(
            unit_dir=config.unit_dir,
            command_timeout=config.command_timeout or 10.0,
            run_as=(uid, gid),
        )
    if isinstance(config, LinuxSshConfig):
        from topologies.ssh import LinuxSshTopology

        return LinuxSshTopology(config)
    if isinstance(config, KubernetesConfig):
        from topologies.k8s import KubernetesTopology

        return KubernetesTopology.from_config(config)
    raise TypeError(f"unknown topology config {type(config).__name__}")
