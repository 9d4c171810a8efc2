"""One KV watch: every change of a bucket's keys delivered, in order, to a callback.

Why not ``KeyValue.watch``: it queues entries for an iterator (a bounded queue that stalls
delivery when full) and uses a 5 s idle heartbeat, so a watch whose consumer died with its
nats-server is noticed and recreated only after ~10 s. Here entries go straight to a
synchronous callback, and the heartbeat is short so the ordered consumer is recreated
within a few seconds of losing its server. Nothing relies on the watch for safety (only
CAS writes prove anything); it only makes reactions fast.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

KV_OP = "KV-Operation"


@dataclass(frozen=True)
class Change:
    key: str
    revision: int
    value: bytes | None
    """None for a delete or purge marker."""


class KvWatch:
    """Watch ``<bucket>`` keys matching ``pattern``; call ``on_change`` for each entry.

    The first entries are the current value of every key (last per subject); ``ready`` is
    set once they have all been delivered.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        pattern: str,
        on_change: Callable[[Change], None],
        *,
        heartbeat: float = 1.0,
    ) -> None:
        self._js = js
        self._prefix = f"$KV.{bucket}."
        self._stream = f"KV_{bucket}"
        self._subject = self._prefix + pattern
        self._on_change = on_change
        self._heartbeat = heartbeat
        self._sub: JetStreamContext.PushSubscription | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._sub = await self._js.subscribe(
            self._subject,
            stream=self._stream,
            cb=self._deliver,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=self._heartbeat,
            inactive_threshold=300.0,
        )
        info = await self._sub.consumer_info()
        if info.num_pending == 0 and self._sub.delivered == 0:
            self.ready.set()

    async def _deliver(self, msg: Msg) -> None:
        meta = msg.metadata
        op = msg.headers.get(KV_OP) if msg.headers else None
        if op is None and msg.headers and "Nats-Marker-Reason" in msg.headers:
            op = "DEL"
        self._on_change(
            Change(
                key=msg.subject[len(self._prefix) :],
                revision=meta.sequence.stream,
                value=None if op in ("DEL", "PURGE") else bytes(msg.data),
            )
        )
        if meta.num_pending == 0:
            self.ready.set()

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            # The connection may already be closed: nothing left to undo then.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
