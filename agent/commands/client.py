"""The operator's side of the mesh: connect with a deadline, read buckets, send commands.

Unlike the agent (which retries its first connect for ever), a CLI must give up quickly
with one clear line, so everything here is bounded by the caller's timeout and raises
``MeshError`` with a message ready for ``fail()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.cli.profile import Profile, ProfileError
from agent.cli.profile import redact as redact  # noqa: PLC0414 (re-exported)


def _import_nats_without_websockets() -> None:
    """nats-py imports aiohttp (about a third of the CLI's start-up) only for ``ws://``
    URLs, and does without it when it is missing. A CLI that imports nats-py first hides
    aiohttp for that one import; importing aiohttp later still works, and ``ws://`` URLs
    then say plainly that this CLI does not speak WebSocket."""
    if "nats" in sys.modules or "aiohttp" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]
    try:
        import nats.aio.transport  # noqa: F401
    finally:
        del sys.modules["aiohttp"]


_import_nats_without_websockets()


class _QuietTlsClose(logging.Filter):
    """asyncio logs "returning true from eof_received() has no effect when using ssl"
    whenever a TLS server closes a connection first: noise on every CLI call over TLS."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_QuietTlsClose())

import nats  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.errors import Error as NatsError  # noqa: E402
from nats.errors import NoRespondersError  # noqa: E402
from nats.js.errors import BucketNotFoundError  # noqa: E402
from nats.js.errors import Error as JsError  # noqa: E402
from nats.js.kv import KeyValue  # noqa: E402

from mesh.authz import inbox_prefix_for  # noqa: E402
from mesh.names import STATE_BUCKET, TRUST_BUCKET, store_bucket  # noqa: E402

if TYPE_CHECKING:
    from agent.commands.reply import Reply
    from agent.meshview import MeshState

MESH_BUCKETS = (STATE_BUCKET, TRUST_BUCKET)


class MeshError(Exception):
    """The mesh could not answer; the message is the one line the operator reads."""


def _tls(profile: Profile) -> ssl.SSLContext | None:
    ca, cert, key = profile.ca_file, profile.cert_file, profile.key_file
    if not (ca or cert or any(u.startswith("tls://") for u in profile.servers)):
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        which = "--tls-cert/--tls-key" if cert else "--tls-ca"
        detail = getattr(exc, "strerror", None) or exc
        raise ProfileError(f"TLS files ({which}): {detail}") from None
    return ctx


class MeshClient:
    """A short-lived connection for one CLI invocation."""

    def __init__(self, nc: Client, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout
        self.js = nc.jetstream(timeout=timeout)
        self.errors: list[str] = []
        self._buckets: dict[str, KeyValue] = {}

    async def bucket(self, name: str, timeout: float | None = None) -> KeyValue:
        if name not in self._buckets:
            try:
                self._buckets[name] = await asyncio.wait_for(
                    self.js.key_value(name), timeout or self.timeout
                )
            except BucketNotFoundError:
                raise MeshError(
                    f"mesh not initialised: bucket {name!r} does not exist "
                    "(no agent has started against this NATS yet)"
                ) from None
            except (NatsError, JsError, TimeoutError) as exc:
                raise MeshError(f"cannot open bucket {name!r}: {self.explain(exc)}") from None
        return self._buckets[name]

    async def store_buckets(self) -> list[str]:
        """The lease stores the mesh descriptor names."""
        from mesh.descriptor import read_descriptor

        desc = await read_descriptor(await self.bucket(STATE_BUCKET))
        return [store_bucket(s) for s in desc.stores] if desc is not None else []

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
        from agent.meshview import MeshState

        state = state or MeshState()
        store_wait = min(2.0, self.timeout / 2)
        watchers = await self.follow(state)
        try:
            await asyncio.gather(*(w.initial for w in watchers if w.bucket in MESH_BUCKETS))
            # A lease store lives on one site's server: a site that is down must not keep
            # the rest of the mesh from being shown (the others answer; a quorum suffices).
            stores = [w.initial for w in watchers if w.bucket not in MESH_BUCKETS]
            if stores:
                await asyncio.wait(stores, timeout=store_wait)
        finally:
            for w in watchers:
                await w.stop()
        return state

    async def _store(self, name: str) -> KeyValue | None:
        """A lease store's bucket, or None when its site does not answer in half the
        deadline: nats-server does not answer for a single-replica stream whose server is
        down, and the other stores must still be shown within the deadline."""
        try:
            return await asyncio.wait_for(self.bucket(name), self.timeout / 2)
        except (MeshError, TimeoutError):
            return None

    async def follow(
        self, state: MeshState, on_change: Callable[[], None] | None = None
    ) -> list[BucketFollower]:
        """Start one watch per bucket feeding ``state``; await ``.initial`` of each."""
        kvs = [(b, await self.bucket(b)) for b in MESH_BUCKETS]
        stores = await self.store_buckets()
        opened = await asyncio.gather(*(self._store(b) for b in stores))
        # A lease store of a site that is down is left out: the others answer.
        kvs += [(b, kv) for b, kv in zip(stores, opened, strict=True) if kv is not None]
        followers = [BucketFollower(kv, b, state, on_change) for b, kv in kvs]
        store_wait = min(2.0, self.timeout / 2)  # a store on a site that is down: skip it
        started = []
        for f in followers:
            try:
                await f.start(self.timeout if f.bucket in MESH_BUCKETS else store_wait)
            except MeshError:
                if f.bucket in MESH_BUCKETS:
                    raise
                continue  # a lease store of a site that is down
            started.append(f)
        return started

    async def request(self, subject: str, body: dict[str, Any], timeout: float) -> Reply:
        """Send one command; raises MeshError when nobody answers."""
        from agent.commands.reply import Reply

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
async def open_mesh(target: Profile | Sequence[str], timeout: float) -> AsyncIterator[MeshClient]:
    """Connect within ``timeout`` or raise MeshError naming the servers tried (passwords
    redacted). ``target`` is a resolved connection profile, or bare server URLs."""
    profile = target if isinstance(target, Profile) else Profile(servers=tuple(target))
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)

    for url in profile.servers:
        if url.startswith(("ws://", "wss://")) and "aiohttp" not in sys.modules:
            import importlib.util

            if importlib.util.find_spec("aiohttp") is None:
                raise MeshError(f"{redact(url)}: WebSocket URLs need aiohttp installed")
    try:
        password = profile.password()
        tls = _tls(profile)
    except ProfileError as exc:
        raise MeshError(str(exc)) from None
    auth: dict[str, Any] = {}
    if profile.user:
        auth = {"user": profile.user, "password": password}
    # Per-identity permissions allow only this identity's own inbox (mesh.authz).
    prefix = inbox_prefix_for(profile.cert_file)
    if prefix:
        auth["inbox_prefix"] = prefix
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=list(profile.servers),
                name="harmony-agent cli",
                connect_timeout=max(1, round(timeout / 2)),
                allow_reconnect=False,
                # Two quick tries per server, then NoServersError (0 would mean "for ever").
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                error_cb=on_error,
                user_credentials=profile.credentials or None,
                tls=tls,
                **auth,
            ),
            timeout,
        )
    except (NatsError, OSError, TimeoutError, ssl.SSLError) as exc:
        why = errors[-1] if errors else str(exc)
        if not why or why in ("TimeoutError", "nats: timeout"):
            why = "no answer"
        for url in profile.servers:
            why = why.replace(url, redact(url))
        raise MeshError(
            f"mesh unreachable at {profile.where}: {why} (timeout {timeout:g}s)"
        ) from None
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
