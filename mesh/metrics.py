"""Prometheus metrics of sessions and leases (the agent exposes the default registry).

No labels per lease or per agent: cardinality stays flat with 1,000 leases, and several
managers in one process (tests, benchmarks) simply add up.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LEASES_HELD = Gauge("harmony_leases_held", "Leases this process holds now")
RENEW_SECONDS = Histogram(
    "harmony_session_renew_seconds",
    "Latency of session renewals that succeeded (one renewal covers every lease held)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
ACQUISITIONS = Counter("harmony_lease_acquisitions", "Leases acquired (CAS write landed)")
LOSSES = Counter(
    "harmony_lease_losses",
    "Leases no longer held, by reason (released, session, rewritten)",
    ["reason"],
)
SESSION_EXPIRIES = Counter(
    "harmony_session_expiries", "Other agents' sessions this process expired by CAS"
)
