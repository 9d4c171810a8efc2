"""Idempotent creation of the mesh's buckets and stream (CONTRACT section 7).

Every agent runs this at start; several may run it at once. JetStream treats an identical
``add_stream`` as a no-op, a different one as an error, in which case the existing bucket
wins (an operator may have tuned it). Replicas are the configured value capped at what the
cluster can place: we ask, and step down when the server says there are too few peers.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, ServiceUnavailableError
from nats.js.kv import KeyValue

from mesh.names import EVENTS_STREAM, EVENTS_SUBJECTS, LEASES_BUCKET, STATE_BUCKET, TRUST_BUCKET

log = structlog.get_logger("mesh.bootstrap")

# JetStream API error codes that mean "not enough servers for that many replicas".
_TOO_FEW_PEERS = {10074, 10023, 10005}
_EXISTS_DIFFERENT = 10058
EVENTS_MAX_AGE = 7 * 24 * 3600.0


@dataclass
class Buckets:
    state: KeyValue
    leases: KeyValue
    trust: KeyValue
    replicas: int


def _too_few_peers(exc: APIError) -> bool:
    text = (exc.description or "").lower()
    return exc.err_code in _TOO_FEW_PEERS or "replicas" in text or "insufficient" in text


async def _kv(
    js: JetStreamContext, bucket: str, replicas: int, history: int
) -> tuple[KeyValue, int]:
    r = replicas
    while True:
        try:
            cfg = KeyValueConfig(
                bucket=bucket, history=history, replicas=r, storage=StorageType.FILE
            )
            return await js.create_key_value(cfg), r
        except BadRequestError as exc:
            if exc.err_code == _EXISTS_DIFFERENT or "already in use" in (exc.description or ""):
                log.info("bucket exists with another configuration; using it", bucket=bucket)
                return await js.key_value(bucket), r
            if r > 1 and _too_few_peers(exc):
                r -= 1
                continue
            raise
        except ServiceUnavailableError:
            raise
        except APIError as exc:
            if r > 1 and _too_few_peers(exc):
                r -= 1
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
    except BadRequestError as exc:
        if exc.err_code != _EXISTS_DIFFERENT and "already in use" not in (exc.description or ""):
            raise


async def ensure_mesh(js: JetStreamContext, replicas: int) -> Buckets:
    """Create (or bind to) every bucket and stream; return handles to the buckets."""
    state, r = await _kv(js, STATE_BUCKET, replicas, history=1)
    # Later buckets start from the replica count the first one could be placed with.
    leases, r = await _kv(js, LEASES_BUCKET, r, history=1)
    trust, r = await _kv(js, TRUST_BUCKET, r, history=5)
    await _events(js, r)
    log.info("mesh buckets ready", replicas=r)
    return Buckets(state=state, leases=leases, trust=trust, replicas=r)
