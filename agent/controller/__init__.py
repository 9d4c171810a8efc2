"""The application controller: traits, FailoverStrategy, reconcile.

``decide`` is the pure rule book (unit-tested with a fake clock); ``runner`` carries plans
out; ``controller`` routes inputs to runners and is their ``Ports``.
"""

from agent.controller.controller import Controller
from agent.controller.decide import decide, preferred, winner
from agent.controller.model import (
    InstanceState,
    LeaseView,
    PeerInstance,
    Plan,
    Policy,
    Run,
    Snapshot,
    WorkloadView,
)

__all__ = [
    "Controller",
    "InstanceState",
    "LeaseView",
    "PeerInstance",
    "Plan",
    "Policy",
    "Run",
    "Snapshot",
    "WorkloadView",
    "decide",
    "preferred",
    "winner",
]
