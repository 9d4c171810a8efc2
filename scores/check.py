"""Can this topology run this Score? Asked before anything runs, and by ``harmony-agent check``.

mypy answers the question for Scores built in code (``Spec.interpret`` is typed with
``Provides[Capability]``); Scores read from YAML are only known at runtime, so the same
answer is computed from ``required_capabilities`` and ``Topology.capabilities()``.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel

from scores.base import Interpret, Score
from scores.health import HealthSpec
from topologies.base import Topology
from topologies.build import capabilities_of
from topologies.capabilities import KubernetesApi, capability_name
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


DEADLINE_ENFORCED = "deadline enforced outside the agent"
DEADLINE_NOT_ENFORCED = "deadline not enforced outside the agent"


def interpret_class(score: Score) -> type[Interpret] | None:
    """The Interpret class ``score.interpret()`` returns, read from its annotation, so the
    question can be answered without a topology (``harmony-agent check``)."""
    method = getattr(type(score), "interpret", None)
    returned = getattr(method, "__annotations__", {}).get("return")
    if isinstance(returned, str):  # ``from __future__ import annotations``: a name
        returned = vars(sys.modules[method.__module__]).get(returned)
    return returned if isinstance(returned, type) and issubclass(returned, Interpret) else None


def deadline_enforcement(score: Score) -> tuple[bool, str]:
    """(``Interpret.enforces_deadline``, the sentence ``check`` and ``status`` show).

    An Interpret may say how in a ``deadline_note`` class attribute, e.g. "deadline
    enforced outside the agent (transient systemd timer)".
    """
    cls = interpret_class(score)
    enforced = bool(getattr(cls, "enforces_deadline", False))
    note = getattr(cls, "deadline_note", None)
    if isinstance(note, str) and note:
        return enforced, note
    return enforced, DEADLINE_ENFORCED if enforced else DEADLINE_NOT_ENFORCED


async def probe_problems(
    health: HealthSpec | None, score: Score, topology: Topology | Any
) -> list[tuple[str, str]]:
    """(field, problem) for the health probe of ``score`` on a built ``topology``: a probe
    the topology cannot run, an exec program that is not executable there. Checking an exec
    program runs ``command -v`` over SSH on a linux-ssh topology."""
    from scores.probes import ProbeUnsupported, probe_for, probe_program_problem

    if health is None or health.probe is None:
        return []
    if KubernetesApi in provided(topology):
        if score.kind == "KubernetesDeployment":
            return []  # rendered as the container's readinessProbe; runs in the pod
        return [("spec.health.probe", f"score {score.kind} cannot run an agent probe")]
    try:
        probe_for(health.probe, topology)
    except ProbeUnsupported as exc:
        return [("spec.health.probe", str(exc))]
    problem = await probe_program_problem(health.probe, topology)
    return [("spec.health.probe.exec", problem)] if problem else []
