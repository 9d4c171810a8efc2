"""Real-component test harness: nats-server processes, clusters and network-namespace sites."""
