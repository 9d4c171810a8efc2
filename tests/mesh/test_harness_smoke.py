"""The harness itself: a cluster forms and a KV write replicates."""

from __future__ import annotations

import nats

from tests.harness.nats import NatsCluster


async def test_cluster_replicates_kv(nats_cluster: NatsCluster) -> None:
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        js = nc.jetstream()
        from nats.js.api import KeyValueConfig

        kv = await js.create_key_value(KeyValueConfig(bucket="smoke", replicas=3))
        rev = await kv.put("k", b"v")
        assert rev == 1
        info = await js.stream_info("KV_smoke")
        assert info.config.num_replicas == 3
    finally:
        await nc.close()
