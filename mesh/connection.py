"""The agent's connection to the mesh: TLS, credentials, endless reconnects, visible state.

nats-py reconnects by itself once connected, but gives up on the *first* connect when no
server answers; an agent booted before its mesh (a node rebooting with its site) must keep
trying, so the first connect is retried here with capped exponential backoff.

Identity: a client certificate (``TlsFiles``), a ``.creds`` file, or a user with a
password *file* (read at each connect, registered with ``mesh.redact`` so it is masked in
every log line; never in a URL). Certificates are renewed in place on disk: nats-py builds
each (re)connection's TLS from ``options["tls"]``, so ``refresh_tls`` swaps in a context
built from the current files, and every disconnect does so when the files changed; the
live connection (and the session on it) is left alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nats
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext

from mesh.redact import redact, register
from mesh.tlsfiles import read_secret

log = structlog.get_logger("mesh.connection")


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
        )
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx

    def digest(self) -> str:
        """Changes whenever any of the files' content does (renewal, new bundle)."""
        h = hashlib.sha256()
        for path in (self.ca_file, self.cert_file, self.key_file):
            h.update(b"\0")
            if path is not None:
                try:
                    h.update(path.read_bytes())
                except OSError:
                    h.update(b"?")
        return h.hexdigest()


@dataclass(frozen=True)
class ConnectionOptions:
    servers: tuple[str, ...]
    name: str
    tls: TlsFiles | None = None
    credentials: Path | None = None
    user: str | None = None
    password_file: Path | None = None
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.5
    ping_interval: float = 5.0
    max_outstanding_pings: int = 2
    inbox_prefix: str = "_INBOX"
    """A private prefix (``_INBOX_<site>_<node>`` for an agent), so per-agent permissions
    can allow only our own replies (``mesh.authz``)."""


class MeshConnection:
    """One nats-py client plus the facts health and metrics need about it."""

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.nc: Client = Client()
        self.disconnects = 0
        self.reconnects = 0
        self.last_change = time.monotonic()
        self.on_state_change: Callable[[bool], None] | None = None
        self.closing = False
        self._tls_digest: str | None = None
        self.tls_refreshes = 0

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.options.tls
        if tls is None:
            return None
        self._tls_digest = tls.digest()
        return tls.context()

    def refresh_tls(self, *, force: bool = False) -> bool:
        """Use a context built from the current files for the next (re)connection; True
        when the files had changed (or ``force``). The live connection is untouched."""
        tls = self.options.tls
        if tls is None or (not force and tls.digest() == self._tls_digest):
            return False
        try:
            ctx = self._tls_context()
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "tls_files_unusable",
                msg="TLS files unusable; keeping the previous context",
                error=redact(repr(exc)),
            )
            return False
        self.nc.options["tls"] = ctx
        self.tls_refreshes += 1
        log.info("tls_refreshed", msg="client TLS context rebuilt from renewed files")
        return True

    def _password(self) -> str | None:
        if self.options.password_file is None:
            return None
        return register(read_secret(self.options.password_file))

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream(timeout=max(2.0, self.options.connect_timeout))

    @property
    def server_url(self) -> str | None:
        url = self.nc.connected_url
        return url.geturl() if url is not None else None

    @property
    def server_url_redacted(self) -> str | None:
        """The server we talk to, without any password (for logs and status replies)."""
        url = self.nc.connected_url
        if url is None:
            return None
        host = url.hostname or ""
        port = f":{url.port}" if url.port else ""
        return f"{url.scheme}://{host}{port}"

    def _changed(self, up: bool) -> None:
        self.last_change = time.monotonic()
        if self.on_state_change:
            self.on_state_change(up)

    async def _disconnected(self) -> None:
        if self.closing:
            return
        self.disconnects += 1
        log.warning(
            "mesh_disconnected",
            msg=f"disconnected from {self.server_url_redacted}",
            server=self.server_url_redacted,
        )
        self.refresh_tls()  # the reconnect then presents renewed certificates
        self._changed(False)

    async def _reconnected(self) -> None:
        self.reconnects += 1
        log.info(
            "mesh_reconnected",
            msg=f"reconnected to {self.server_url_redacted}",
            server=self.server_url_redacted,
        )
        self._changed(True)

    async def _error(self, exc: Exception) -> None:
        # Warning, not debug: this is also where an exception escaping a subscription
        # callback ends up (nats-py catches it), and that is a bug to see.
        log.warning(
            "mesh_client_error",
            msg=f"NATS client error: {redact(repr(exc))}",
            error=redact(repr(exc)),
        )

    async def connect(self, *, max_backoff: float = 5.0) -> None:
        """Connect, retrying for ever with backoff; cancel to give up."""
        opts = self.options
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                extra: dict[str, object] = {}
                if opts.user is not None:
                    extra["user"] = opts.user
                    extra["password"] = self._password()
                await self.nc.connect(
                    servers=list(opts.servers),
                    name=opts.name,
                    tls=self._tls_context(),
                    user_credentials=str(opts.credentials) if opts.credentials else None,
                    connect_timeout=opts.connect_timeout,  # type: ignore[arg-type]
                    reconnect_time_wait=opts.reconnect_wait,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    ping_interval=opts.ping_interval,  # type: ignore[arg-type]
                    max_outstanding_pings=opts.max_outstanding_pings,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    error_cb=self._error,
                    allow_reconnect=True,
                    inbox_prefix=opts.inbox_prefix,
                    **extra,  # type: ignore[arg-type]
                )
            except (OSError, TimeoutError, ValueError, nats.errors.Error) as exc:
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "mesh unreachable; retrying", error=redact(repr(exc)), attempt=attempt
                    )
                self.nc = Client()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            log.info(
                "mesh_connected",
                msg=f"connected to {self.server_url_redacted}",
                server=self.server_url_redacted,
            )
            self._changed(True)
            return

    async def close(self) -> None:
        self.closing = True
        if self.nc.is_connected or self.nc.is_reconnecting:
            try:
                await asyncio.wait_for(self.nc.drain(), 2.0)
            except (TimeoutError, nats.errors.Error):
                await self.nc.close()
        elif not self.nc.is_closed:
            await self.nc.close()
