"""Idempotent creation of the mesh's buckets, streams and lease stores (CONTRACT section 7).

Who runs it: ``harmony-agent mesh init`` with admin credentials, or (in a mesh without
per-role credentials) every agent at start. Several may run it at once: JetStream treats an
identical ``add_stream`` as a no-op, a different one as an error, in which case the existing
one wins (an operator may have tuned it).

The **mesh descriptor** (``mesh`` in ``harmony-state``) fixes the lease stores once: every
agent must count quorums over the same stores, so an agent whose configuration names other
stores refuses to start (``MeshMismatch``) instead of deciding over a different set.

Replicated buckets (``harmony-state``, ``harmony-trust``, the events stream) get the
configured replicas capped at what the cluster can place. Lease stores are single-replica
and placed on a server tagged ``site:<store>`` (see ``mesh.stores``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    Placement,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, KeyWrongLastSequenceError
from nats.js.errors import Error as JsError
from nats.js.kv import KeyValue

from mesh.clock import now_rfc3339
from mesh.codec import MAX_VALUE_BYTES
from mesh.descriptor import Descriptor, read_descriptor
from mesh.names import (
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    LEASE_VIEW_BUCKET,
    MESH_KEY,
    STATE_BUCKET,
    TRUST_BUCKET,
    store_bucket,
    store_stream,
)

log = structlog.get_logger("mesh.bootstrap")

_NON_CLUSTERED = 10074
_TOO_FEW_PEERS = {10023, 10005}
_EXISTS_DIFFERENT = 10058
EVENTS_MAX_AGE = 7 * 24 * 3600.0
PEER_GRACE = 60.0
"""How long to keep asking for the configured replicas before concluding the cluster is
smaller: a bucket created at R2 while a peer restarts would stay R2 for good."""


class MeshMismatch(ValueError):
    """The configuration disagrees with the mesh descriptor; one line for the operator."""


@dataclass
class Mesh:
    state: KeyValue
    trust: KeyValue
    descriptor: Descriptor
    replicas: int
    lease_view: KeyValue | None = None
    """``harmony-leases``: the contract's view of who holds what (mesh/mirror.py)."""

    @property
    def stores(self) -> list[str]:
        return list(self.descriptor.stores)


def _non_clustered(exc: APIError) -> bool:
    return exc.err_code == _NON_CLUSTERED or "non-clustered" in (exc.description or "")


def _too_few_peers(exc: APIError) -> bool:
    text = (exc.description or "").lower()
    return exc.err_code in _TOO_FEW_PEERS or "insufficient" in text or "no suitable" in text


def _exists(exc: APIError) -> bool:
    return exc.err_code == _EXISTS_DIFFERENT or "already in use" in (exc.description or "")


async def _kv(
    js: JetStreamContext, bucket: str, replicas: int, history: int, grace: float
) -> tuple[KeyValue, int]:
    r = replicas
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + grace
    backoff = 0.2
    while True:
        cfg = KeyValueConfig(
            bucket=bucket,
            history=history,
            replicas=r,
            storage=StorageType.FILE,
            max_value_size=MAX_VALUE_BYTES,
        )
        try:
            return await js.create_key_value(cfg), r
        except APIError as exc:
            if _exists(exc):
                log.info(
                    "bucket_config_differs",
                    msg=f"bucket {bucket} exists with another configuration; using it",
                    bucket=bucket,
                )
                return await js.key_value(bucket), r
            if r > 1 and _non_clustered(exc):
                r = 1
                continue
            if r > 1 and _too_few_peers(exc):
                if loop.time() < give_up_at:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                log.warning(
                    "cluster cannot place the configured replicas", bucket=bucket, replicas=r - 1
                )
                r -= 1
                give_up_at = loop.time() + grace
                continue
            raise


async def _events(js: JetStreamContext, replicas: int) -> None:
    cfg = StreamConfig(
        name=EVENTS_STREAM,
        subjects=list(EVENTS_SUBJECTS),
        num_replicas=replicas,
        max_age=EVENTS_MAX_AGE,
        storage=StorageType.FILE,
        max_msg_size=MAX_VALUE_BYTES,
    )
    try:
        await js.add_stream(cfg)
    except APIError as exc:
        if not _exists(exc):
            raise


async def ensure_store(js: JetStreamContext, store: str, grace: float = PEER_GRACE) -> None:
    """Create one lease store (idempotent): a single-replica KV bucket on its site.

    Created as a plain stream because nats-py's ``create_key_value`` drops ``placement``.
    "No suitable peer" is retried for ``grace`` seconds: a tagged server that has just
    joined is unknown to the meta leader until its first statsz, so an agent starting
    with its cluster would otherwise refuse a correct configuration.
    """
    cfg = StreamConfig(
        name=store_stream(store),
        subjects=[f"$KV.{store_bucket(store)}.>"],
        num_replicas=1,
        max_msgs_per_subject=1,
        discard=DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        storage=StorageType.FILE,
        max_msg_size=MAX_VALUE_BYTES,
        placement=Placement(tags=[f"site:{store}"]),
    )
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + grace
    backoff = 0.2
    while True:
        try:
            await js.add_stream(cfg)
            return
        except APIError as exc:
            if _exists(exc):
                return
            if not _too_few_peers(exc):
                raise
            if loop.time() >= give_up_at:
                raise MeshMismatch(
                    f"lease store {store!r}: no JetStream server tagged site:{store} "
                    "(server_tags in its nats-server configuration)"
                ) from None
            if backoff == 0.2:
                log.warning(
                    "store_peer_missing",
                    msg=f"lease store {store}: no server tagged site:{store} known yet; "
                    f"asking again for up to {grace:.0f} s",
                    store=store,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


async def ensure_descriptor(
    state: KeyValue, stores: list[str] | None, replicas: int, default: list[str] | None = None
) -> Descriptor:
    """Read the descriptor, creating it from ``stores`` (or ``default``) when absent;
    refuse a configured ``stores`` that differs from it."""
    for _ in range(30):
        found = await read_descriptor(state)
        if found is not None:
            if stores and list(found.stores) != list(stores):
                raise MeshMismatch(
                    f"mesh.stores: configured {stores} but the mesh uses {list(found.stores)} "
                    "(every agent must decide over the same stores)"
                )
            return found
        # (A default is ours to write, not a configuration to hold others to: two agents
        # bootstrapping at once each default to their own site, and the loser must take
        # the winner's descriptor.)
        wanted = stores or default
        if not wanted:
            raise MeshMismatch(
                "mesh.stores: the mesh has no descriptor yet; run `harmony-agent mesh init` "
                "or configure mesh.stores on the bootstrapping agent"
            )
        desc = Descriptor(tuple(wanted), replicas, now_rfc3339())
        try:
            await state.create(MESH_KEY, desc.encode())
            log.info("mesh_descriptor_written", msg=f"mesh descriptor written: stores {wanted}")
            return desc
        except KeyWrongLastSequenceError:
            continue  # someone else wrote it first: read theirs
        except (TimeoutError, NatsError):
            await asyncio.sleep(0.5)  # a new R3 bucket still settling: read again
            continue
    raise MeshMismatch("mesh descriptor: concurrent writers, try again")


async def ensure_mesh(
    js: JetStreamContext,
    replicas: int,
    *,
    stores: list[str] | None = None,
    default_stores: list[str] | None = None,
    peer_grace: float = PEER_GRACE,
) -> Mesh:
    """Create (or bind to) every bucket, stream and lease store; return handles.

    ``stores`` must match the descriptor if one exists; ``default_stores`` only fills in
    a descriptor that does not exist yet."""
    state, r = await _kv(js, STATE_BUCKET, replicas, 1, peer_grace)
    trust, r = await _kv(js, TRUST_BUCKET, r, 5, peer_grace)
    view, r = await _kv(js, LEASE_VIEW_BUCKET, r, 1, peer_grace)
    await _events(js, r)
    desc = await ensure_descriptor(state, stores, r, default_stores)
    for store in desc.stores:
        await ensure_store(js, store, peer_grace)
    log.info(
        "mesh_ready",
        msg=f"mesh ready: replicas {r}, lease stores {', '.join(desc.stores)}",
        replicas=r,
        stores=list(desc.stores),
    )
    return Mesh(state=state, trust=trust, descriptor=desc, replicas=r, lease_view=view)


async def bind_mesh(js: JetStreamContext, *, stores: list[str] | None = None) -> Mesh:
    """Bind to a mesh an admin created (no create rights needed); refuse a mismatch."""
    try:
        state = await js.key_value(STATE_BUCKET)
        trust = await js.key_value(TRUST_BUCKET)
    except JsError as exc:
        raise MeshMismatch(f"mesh not initialised ({exc}): run `harmony-agent mesh init`") from None
    desc = (
        await ensure_descriptor(state, None, 0) if not stores else await _bind_desc(state, stores)
    )
    try:
        view: KeyValue | None = await js.key_value(LEASE_VIEW_BUCKET)
    except JsError:
        view = None  # an older mesh: no view to publish into
    return Mesh(state=state, trust=trust, descriptor=desc, replicas=0, lease_view=view)


async def _bind_desc(state: KeyValue, stores: list[str]) -> Descriptor:
    found = await read_descriptor(state)
    if found is None:
        raise MeshMismatch("mesh descriptor missing: run `harmony-agent mesh init`")
    if list(found.stores) != list(stores):
        raise MeshMismatch(
            f"mesh.stores: configured {stores} but the mesh uses {list(found.stores)}"
        )
    return found
