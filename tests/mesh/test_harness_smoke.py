"""The harness itself: a cluster forms and a KV write replicates."""

from __future__ import annotations

import nats
from nats.js.api import KeyValueConfig

from tests.harness.nats import NatsCluster, writable


async def test_cluster_replicates_kv(nats_cluster: NatsCluster) -> None:
    nc = await nats.connect(servers=nats_cluster.urls)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket="smoke", replicas=3))
        # CI saw the first put right after the create get "no response from stream": the
        # new stream's interest had not yet reached the server this client is on.
        await writable(nats_cluster.urls, ["smoke"])
        rev = await kv.put("k", b"v")
        assert rev == 1
        info = await js.stream_info("KV_smoke")
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    finally:
        await nc.close()
