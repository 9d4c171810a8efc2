"""The mesh: NATS + JetStream connections, KV buckets, sessions and leases, the embedded
nats-server, and per-site trust. It knows nothing of controllers, Scores or Topologies."""
