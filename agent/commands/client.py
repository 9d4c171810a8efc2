"""The operator's side of the mesh: connect with a deadline, read buckets, send commands.

Unlike the agent (which retries its first connect for ever), a CLI must give up quickly
with one clear line, so everything here is bounded by the caller's timeout and raises
``MeshError`` with a message ready for ``fail()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js.errors import BucketNotFoundError
from nats.js.errors import Error as JsError
from nats.js.kv import KeyValue

from agent.commands.models import Reply
from agent.meshview import MeshState
from mesh.authz import inbox_prefix_for
from mesh.names import LEASES_BUCKET, STATE_BUCKET, TRUST_BUCKET

ALL_BUCKETS = (STATE_BUCKET, LEASES_BUCKET, TRUST_BUCKET)
CREDS_ENV = "HARMONY_NATS_CREDS"
CA_ENV = "HARMONY_NATS_CA"
CERT_ENV = "HARMONY_NATS_CERT"
KEY_ENV = "HARMONY_NATS_KEY"


def redact(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class MeshError(Exception):
    """The mesh could not answer; the message is the one line the operator reads."""


def _tls() -> ssl.SSLContext | None:
    ca, cert, key = (os.environ.get(n) for n in (CA_ENV, CERT_ENV, KEY_ENV))
    if not (ca or cert):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


class MeshClient:
    """A short-lived connection for one CLI invocation."""

    def __init__(self, nc: Client, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout
        self.js = nc.jetstream(timeout=timeout)
        self.errors: list[str] = []
        self._buckets: dict[str, KeyValue] = {}

    async def bucket(self, name: str) -> KeyValue:
        if name not in self._buckets:
            try:
                self._buckets[name] = await self.js.key_value(name)
            except BucketNotFoundError:
                raise MeshError(
                    f"mesh not initialised: bucket {name!r} does not exist "
                    "(no agent has started against this NATS yet)"
                ) from None
            except (NatsError, JsError, TimeoutError) as exc:
                raise MeshError(f"cannot open bucket {name!r}: {self.explain(exc)}") from None
        return self._buckets[name]

    def explain(self, exc: BaseException) -> str:
        """One line for a failed mesh call, with the server's last complaint if any (a
        permissions violation surfaces only through the error callback)."""
        detail = str(exc)
        if not detail or detail in ("TimeoutError", "nats: timeout"):
            detail = "no answer"
        if self.errors:
            detail += f" ({self.errors[-1]})"
        return detail

    async def read(self, state: MeshState | None = None) -> MeshState:
        """Every live entry of the three buckets, one ordered consumer per bucket."""
        state = state or MeshState()
        watchers = await self.follow(state)
        try:
            await asyncio.gather(*(w.initial for w in watchers))
        finally:
            for w in watchers:
                await w.stop()
        return state

    async def follow(
        self, state: MeshState, on_change: Callable[[], None] | None = None
    ) -> list[BucketFollower]:
        """Start one watch per bucket feeding ``state``; await ``.initial`` of each."""
        followers = [BucketFollower(await self.bucket(b), b, state, on_change) for b in ALL_BUCKETS]
        for f in followers:
            await f.start(self.timeout)
        return followers

    async def request(self, subject: str, body: dict[str, Any], timeout: float) -> Reply:
        """Send one command; raises MeshError when nobody answers."""
        import json

        try:
            msg = await self.nc.request(subject, json.dumps(body).encode(), timeout=timeout)
        except NoRespondersError:
            raise MeshError(f"no agent serves {subject}") from None
        except (NatsError, TimeoutError) as exc:
            raise MeshError(
                f"no reply on {subject} within {timeout:g}s: {self.explain(exc)}"
            ) from None
        return Reply.decode(msg.data)


class BucketFollower:
    """One KV watch feeding a ``MeshState``; ``initial`` resolves once history is read."""

    def __init__(
        self,
        kv: KeyValue,
        bucket: str,
        state: MeshState,
        on_change: Callable[[], None] | None,
    ) -> None:
        self.kv = kv
        self.bucket = bucket
        self.state = state
        self.on_change = on_change
        self.initial: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float) -> None:
        try:
            self._watcher = await asyncio.wait_for(self.kv.watchall(), timeout)
        except (NatsError, JsError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise MeshError(f"cannot watch bucket {self.bucket!r}: {why}") from None
        self._task = asyncio.create_task(self._run(), name=f"watch {self.bucket}")

    async def _run(self) -> None:
        async for entry in self._watcher:
            if entry is None:
                if not self.initial.done():
                    self.initial.set_result(None)
                continue
            self.state.apply(self.bucket, entry)
            if self.initial.done() and self.on_change is not None:
                self.on_change()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._watcher is not None:
            with contextlib.suppress(NatsError, JsError, TimeoutError):
                await self._watcher.stop()


@contextlib.asynccontextmanager
async def open_mesh(servers: list[str], timeout: float) -> AsyncIterator[MeshClient]:
    """Connect within ``timeout`` or raise MeshError naming the servers tried."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)

    creds = os.environ.get(CREDS_ENV)
    # Per-identity permissions allow only this identity's own inbox (mesh.authz).
    prefix = inbox_prefix_for(os.environ.get(CERT_ENV))
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                **({"inbox_prefix": prefix} if prefix else {}),
                servers=servers,
                name="harmony-agent cli",
                connect_timeout=max(1, round(timeout / 2)),
                allow_reconnect=False,
                # Two quick tries per server, then NoServersError (0 would mean "for ever").
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                error_cb=on_error,
                user_credentials=creds or None,
                tls=_tls(),
            ),
            timeout,
        )
    except (NatsError, OSError, TimeoutError, ssl.SSLError) as exc:
        why = errors[-1] if errors else str(exc)
        if not why or why in ("TimeoutError", "nats: timeout"):
            why = "no answer"
        where = ", ".join(redact(u) for u in servers)
        raise MeshError(f"mesh unreachable at {where}: {why} (timeout {timeout:g}s)") from None
    client = MeshClient(nc, timeout)
    client.errors = errors
    try:
        yield client
    finally:
        with contextlib.suppress(NatsError, TimeoutError, OSError):
            await asyncio.wait_for(nc.close(), timeout)


def run_bounded(coro: Awaitable[Any], timeout: float | None = None) -> Any:
    """Run a CLI coroutine on a fresh loop; ``timeout`` bounds the whole thing."""

    async def main() -> Any:
        if timeout is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise MeshError(f"the mesh did not answer within {timeout:g}s") from None

    return asyncio.run(main())
