"""Can this topology run this Score? Asked before anything runs, and by ``harmony-agent check``.

mypy answers the question for Scores built in code (``Spec.interpret`` is typed with
``Provides[Capability]``); Scores read from YAML are only known at runtime, so the same
answer is computed from ``required_capabilities`` and ``Topology.capabilities()``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from scores.base import Interpret, Score
from topologies.base import Topology
from topologies.build import capabilities_of
from topologies.capabilities import capability_name
from topologies.config import KubernetesConfig, LinuxSshConfig, LocalhostConfig

_TopologyLike = Topology | LocalhostConfig | LinuxSshConfig | KubernetesConfig | frozenset[type]


class CapabilityError(ValueError):
    """A Score was handed to a topology lacking a capability it needs."""


def provided(topology: _TopologyLike) -> frozenset[type]:
    if isinstance(topology, frozenset):
        return topology
    if isinstance(topology, BaseModel):
        return capabilities_of(topology)
    return topology.capabilities()


def _kind(topology: _TopologyLike) -> str:
    if isinstance(topology, frozenset):
        return "capabilities " + ", ".join(sorted(capability_name(c) for c in topology))
    return str(topology.kind)


def missing_capabilities(
    score: Score, topology: _TopologyLike, *, app: str | None = None, site: str | None = None
) -> list[str]:
    """One message per capability ``score`` needs and ``topology`` lacks; empty when fine.

    ``topology`` may be a built Topology, a ``topology:`` config block (nothing is
    connected) or a bare set of capabilities.
    """
    have = provided(topology)
    lacking = sorted(score.required_capabilities - have, key=capability_name)
    where = f"site {site} ({_kind(topology)})" if site else f"the {_kind(topology)} topology"
    prefix = f"{app}: " if app else ""
    return [
        f"{prefix}score {score.kind} needs {capability_name(cap)}, which {where} does not provide"
        for cap in lacking
    ]


def interpret_for(score: Score, topology: Topology, **labels: Any) -> Interpret:
    """The Interpret of ``score`` on ``topology``; CapabilityError names what is missing."""
    problems = missing_capabilities(score, topology, **labels)
    if problems:
        raise CapabilityError("; ".join(problems))
    # The capability check above is the runtime proof the typed interpret() signatures need.
    interpret: Any = getattr(score, "interpret", None)
    if interpret is None:
        raise CapabilityError(f"score {score.kind} has no Interpret")
    result: Interpret = interpret(topology)
    return result
