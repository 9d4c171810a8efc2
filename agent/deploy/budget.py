"""The shutdown budget (issue 9): how long a service manager must let the agent stop.

On SIGTERM the agent keeps its session renewed while every workload stops (SIGTERM, then
SIGKILL after its ``stop_timeout``), then releases or hands over its leases, then closes the
session. ``SHUTDOWN_MARGIN`` covers the lease release through a JetStream leader election
(4-9 s) and the session close. systemd's ``TimeoutStopSec`` and Kubernetes'
``terminationGracePeriodSeconds`` must be at least ``shutdown_budget(max stop_timeout)``.
"""

from __future__ import annotations

import math

SHUTDOWN_MARGIN = 15.0
"""Seconds added to the slowest workload's stop_timeout."""

DEFAULT_MAX_STOP_TIMEOUT = 30.0
"""The slowest stop_timeout the shipped unit and the generated DaemonSet are sized for."""


def shutdown_budget(max_stop_timeout: float = DEFAULT_MAX_STOP_TIMEOUT) -> int:
    """Whole seconds: ``max(stop_timeout) + 15 s``, rounded up."""
    if max_stop_timeout < 0:
        raise ValueError("stop_timeout cannot be negative")
    return math.ceil(max_stop_timeout + SHUTDOWN_MARGIN)
