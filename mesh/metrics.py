"""Prometheus metrics of sessions and leases (the agent serves them with its own).

No labels per lease or per agent: cardinality stays flat with 1,000 leases, and several
managers in one process (tests, benchmarks) simply add up. Every labelled counter has its
label values created at 0 here, so a rate over it exists before the first event.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LEASES_HELD = Gauge("harmony_leases_held", "Leases this process holds now")
RENEW_SECONDS = Histogram(
    "harmony_session_renew_seconds",
    "Latency of session renewals that landed, per store write (one renewal covers every "
    "lease held)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RENEW_FAILURES = Counter(
    "harmony_session_renew_failures",
    "Session renewals that did not land, by reason: error (no answer, store unreachable) "
    "or lost (a foreign write: the epoch is given up in that store)",
    ["reason"],
)
ACQUISITIONS = Counter("harmony_lease_acquisitions", "Leases acquired (CAS write landed)")
LOSSES = Counter(
    "harmony_lease_losses",
    "Leases no longer held, by reason (released, session, rewritten, stopped)",
    ["reason"],
)
SESSION_EXPIRIES = Counter(
    "harmony_session_expiries", "Other agents' sessions this process expired by CAS"
)

for _reason in ("error", "lost"):
    RENEW_FAILURES.labels(_reason)
for _reason in ("released", "session", "rewritten", "stopped"):
    LOSSES.labels(_reason)
