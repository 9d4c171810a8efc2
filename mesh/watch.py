"""One KV watch: every change of a bucket's keys delivered, in order, to a callback.

Why not ``KeyValue.watch``: it queues entries for an iterator (a bounded queue that stalls
delivery when full) and uses a 5 s idle heartbeat. Here entries go straight to a
synchronous callback, the heartbeat is short, and the watch checks its stream every
``check_interval`` so it notices when the stream vanished or was recreated (``closed``):
an ordered consumer would otherwise resume a recreated stream at a sequence it never had.
Nothing relies on a watch for safety (only CAS writes prove anything); it only makes
reactions fast.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

log = structlog.get_logger("mesh.watch")

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
    set once they have all been delivered. ``closed`` is set when the stream disappears
    or is replaced by a new one; the owner then starts a new watch.
    """

    def __init__(
        self,
        nc: Client | JetStreamContext,
        bucket: str,
        pattern: str,
        on_change: Callable[[Change], None],
        *,
        heartbeat: float = 1.0,
        check_interval: float = 2.0,
    ) -> None:
        self._js = nc.jetstream(timeout=5.0) if isinstance(nc, Client) else nc
        self._prefix = f"$KV.{bucket}."
        self._stream = f"KV_{bucket}"
        self._subject = self._prefix + pattern
        self._on_change = on_change
        self._heartbeat = heartbeat
        self._check_interval = check_interval
        self._sub: JetStreamContext.PushSubscription | None = None
        self._checker: asyncio.Task[None] | None = None
        self.created: datetime | None = None
        """The stream's creation time as its server reports it (tells recreations apart)."""
        self.ready = asyncio.Event()
        self.closed = asyncio.Event()

    async def start(self) -> None:
        info = await self._js.stream_info(self._stream)
        self.created = info.created
        self._sub = await self._js.subscribe(
            self._subject,
            stream=self._stream,
            cb=self._deliver,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=self._heartbeat,
            inactive_threshold=300.0,
        )
        info_c = await self._sub.consumer_info()
        if info_c.num_pending == 0 and self._sub.delivered == 0:
            self.ready.set()
        self._checker = asyncio.create_task(self._check(), name=f"check:{self._stream}")

    async def _check(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            try:
                info = await self._js.stream_info(self._stream)
            except NotFoundError:
                log.warning(
                    "watched_stream_gone",
                    msg=f"watched stream {self._stream} is gone",
                    stream=self._stream,
                )
                self.closed.set()
                return
            except (TimeoutError, NatsError, OSError):
                continue  # unreachable for now: the consumer resumes by itself
            if self.created is not None and info.created != self.created:
                log.warning(
                    "watched_stream_recreated",
                    msg=f"watched stream {self._stream} was recreated",
                    stream=self._stream,
                )
                self.closed.set()
                return

    async def _deliver(self, msg: Msg) -> None:
        meta = msg.metadata
        op = msg.headers.get(KV_OP) if msg.headers else None
        if op is None and msg.headers and "Nats-Marker-Reason" in msg.headers:
            op = "DEL"
        try:
            self._on_change(
                Change(
                    key=msg.subject[len(self._prefix) :],
                    revision=meta.sequence.stream,
                    value=None if op in ("DEL", "PURGE") else bytes(msg.data),
                )
            )
        except Exception as exc:  # a bug in a consumer must not kill the subscription
            log.error(
                "watch_callback_failed",
                msg=f"watch callback on {self._stream} failed: {exc!r}",
                stream=self._stream,
                error=repr(exc),
            )
        if meta.num_pending == 0:
            self.ready.set()

    async def stop(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._checker
            self._checker = None
        if self._sub is not None:
            sub, self._sub = self._sub, None
            # The connection may already be closed: nothing left to undo then.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
