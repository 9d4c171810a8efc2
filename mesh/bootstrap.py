"""Idempotent creation of the mesh's buckets and stream (CONTRACT section 7).

Every agent runs this at start; several may run it at once. JetStream treats an identical
``add_stream`` as a no-op, a different one as an error, in which case the existing bucket
wins (an operator may have tuned it). Replicas are the configured value capped at what the
cluster can place: a single server gets R1 at once; a cluster that says it has too few
peers is asked again for a grace period (a peer may be starting) before we step down.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import APIError, ServiceUnavailableError
from nats.js.kv import KeyValue

from mesh.names import EVENTS_STREAM, EVENTS_SUBJECTS, LEASES_BUCKET, STATE_BUCKET, TRUST_BUCKET

log = structlog.get_logger("mesh.bootstrap")

# "replicas > 1 not supported in non-clustered mode": a single server, R1 is all there is.
_NON_CLUSTERED = 10074
# "insufficient resources" / "no suitable peers": maybe a small cluster, maybe a peer that
# is still starting or briefly down. Only the first is a reason to place fewer replicas.
_TOO_FEW_PEERS = {10023, 10005}
_EXISTS_DIFFERENT = 10058
EVENTS_MAX_AGE = 7 * 24 * 3600.0
PEER_GRACE = 60.0
"""How long to keep asking for the configured replicas before concluding the cluster is
smaller: a bucket created at R2 while a peer restarts would stay R2 for good."""


@dataclass
class Buckets:
    state: KeyValue
    leases: KeyValue
    trust: KeyValue
    replicas: int


def _non_clustered(exc: APIError) -> bool:
    return exc.err_code == _NON_CLUSTERED or "non-clustered" in (exc.description or "")


def _too_few_peers(exc: APIError) -> bool:
    text = (exc.description or "").lower()
    return exc.err_code in _TOO_FEW_PEERS or "insufficient" in text or "no suitable" in text


async def _kv(
    js: JetStreamContext, bucket: str, replicas: int, history: int, grace: float
) -> tuple[KeyValue, int]:
    r = replicas
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + grace
    backoff = 0.2
    while True:
        cfg = KeyValueConfig(bucket=bucket, history=history, replicas=r, storage=StorageType.FILE)
        try:
            return await js.create_key_value(cfg), r
        except ServiceUnavailableError:
            raise
        except APIError as exc:
            if exc.err_code == _EXISTS_DIFFERENT or "already in use" in (exc.description or ""):
                log.info("bucket exists with another configuration; using it", bucket=bucket)
                return await js.key_value(bucket), r
            if r > 1 and _non_clustered(exc):
                r = 1
                continue
            if r > 1 and _too_few_peers(exc):
                if loop.time() < give_up_at:
                    log.info("too few JetStream peers for now; waiting", bucket=bucket, replicas=r)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                log.warning(
                    "cluster cannot place the configured replicas; using fewer",
                    bucket=bucket,
                    replicas=r - 1,
                )
                r -= 1
                give_up_at = loop.time() + grace
                continue
            raise


async def _events(js: JetStreamContext, replicas: int) -> None:
    cfg = StreamConfig(
        name=EVENTS_STREAM,
        subjects=[EVENTS_SUBJECTS],
        num_replicas=replicas,
        max_age=EVENTS_MAX_AGE,
        storage=StorageType.FILE,
    )
    try:
        await js.add_stream(cfg)
    except APIError as exc:
        if exc.err_code != _EXISTS_DIFFERENT and "already in use" not in (exc.description or ""):
            raise


async def ensure_mesh(
    js: JetStreamContext, replicas: int, *, peer_grace: float = PEER_GRACE
) -> Buckets:
    """Create (or bind to) every bucket and stream; return handles to the buckets."""
    state, r = await _kv(js, STATE_BUCKET, replicas, 1, peer_grace)
    # Later buckets start from the replica count the first one could be placed with.
    leases, r = await _kv(js, LEASES_BUCKET, r, 1, peer_grace)
    trust, r = await _kv(js, TRUST_BUCKET, r, 5, peer_grace)
    await _events(js, r)
    log.info("mesh buckets ready", replicas=r)
    return Buckets(state=state, leases=leases, trust=trust, replicas=r)
