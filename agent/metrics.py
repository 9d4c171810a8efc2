"""Prometheus metrics of the agent process (the lease metrics live in ``mesh.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

AGENT_INFO = Info("harmony_agent", "Static facts about this agent")
MESH_CONNECTED = Gauge("harmony_mesh_connected", "1 while connected to a NATS server")
MESH_DISCONNECTS = Counter("harmony_mesh_disconnects", "Disconnections from the mesh")
IN_QUORUM = Gauge("harmony_in_quorum", "1 while a mesh write succeeded within the last ttl")
READY = Gauge("harmony_ready", "1 while /readyz answers 200")
UPTIME = Gauge("harmony_uptime_seconds", "Seconds since the agent started")
HEARTBEAT_SECONDS = Histogram(
    "harmony_heartbeat_write_seconds",
    "Latency of heartbeat (session renewal) writes that succeeded",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
HEARTBEAT_FAILURES = Counter(
    "harmony_heartbeat_failures", "Heartbeat writes that failed or were refused", ["result"]
)
LOOP_CYCLES = Counter("harmony_control_loop_cycles", "Control-loop cycles run")
