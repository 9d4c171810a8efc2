"""The application controller (issue 5): traits, FailoverStrategy, reconcile.

``decide`` is the pure rule book (unit-tested with a fake clock); ``runner`` and
``controller`` are the thin I/O around it; ``attach(agent)`` wires it into a running agent.
"""

from agent.controller.controller import Controller, attach
from agent.controller.decide import decide, preferred, winner
from agent.controller.model import (
    Decision,
    InstanceState,
    LeaseView,
    PeerInstance,
    Policy,
    Run,
    Snapshot,
    WorkloadView,
)

__all__ = [
    "Controller",
    "Decision",
    "InstanceState",
    "LeaseView",
    "PeerInstance",
    "Policy",
    "Run",
    "Snapshot",
    "WorkloadView",
    "attach",
    "decide",
    "preferred",
    "winner",
]
