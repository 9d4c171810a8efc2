"""Losing one nats-server of three, the KV stream leader included: no lease is lost.

With ttl = 10 s (the default) a holder's validity outlasts JetStream's re-election of the
stream leader (4-9 s), so renewals resume in time and no workload would be fenced.
"""

from __future__ import annotations

import time

from mesh.names import LEASES_BUCKET, STATE_BUCKET
from tests.harness.nats import NatsCluster
from tests.harness.wait import eventually
from tests.mesh.lease_world import Contender

TTL = 10.0


async def test_killing_the_stream_leader_node_loses_no_lease(nats_cluster: NatsCluster) -> None:
    urls = nats_cluster.urls
    agents = [
        Contender(urls[i:] + urls[:i], f"site-{i}", "n1", ttl=TTL, margin=0.5, step=0.05)
        for i in range(3)
    ]
    try:
        for a in agents:
            await a.start()
        for i, a in enumerate(agents):
            for j, owner in enumerate(agents):
                a.want([f"nk-{j}-{k}" for k in range(5)], rank=0 if owner is a else 1 + i)
        await eventually(
            lambda: sum(len(a.held()) for a in agents) == 15, timeout=15, what="all 15 held"
        )
        before = {a.id: a.held() for a in agents}

        assert agents[0].nc is not None
        js = agents[0].nc.jetstream()
        state = await js.stream_info(f"KV_{STATE_BUCKET}")
        leases = await js.stream_info(f"KV_{LEASES_BUCKET}")
        assert state.cluster is not None and leases.cluster is not None
        # Renewals write the state bucket: killing its leader is the harder case.
        victim = next(n for n in nats_cluster.nodes if n.name == state.cluster.leader)
        victim.kill()
        killed = time.monotonic()

        def renewed_since_kill() -> bool:
            return all(
                a.session is not None
                and a.session.last_write_sent is not None
                and a.session.last_write_sent > killed
                for a in agents
            )

        await eventually(renewed_since_kill, timeout=2 * TTL, what="renewals resume")
        assert all(a.manager is not None and not a.manager.tenures for a in agents), "a loss"
        assert {a.id: a.held() for a in agents} == before
        assert leases.cluster.leader  # the leases stream had a leader before, too
    finally:
        for a in agents:
            await a.kill()
