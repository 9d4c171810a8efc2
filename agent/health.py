"""/healthz, /readyz and /metrics over aiohttp.

Liveness follows Patroni: the control loop ran within the last ttl, not "the process is
up" (a wedged loop in a live process must be restarted). Readiness is the mesh view:
connected, buckets ready, and a mesh write succeeded within the last ttl.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.registry import CollectorRegistry

from agent.metrics import render_families

log = structlog.get_logger("agent.health")

Probe = Callable[[], tuple[bool, dict[str, Any]]]


class ListenError(RuntimeError):
    """An address this agent must listen on cannot be bound; the message is one line."""


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9808`` for IPv6) as (host, port); an empty host is loopback."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _bind_error(what: str, listen: str, exc: OSError) -> str:
    reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
    return f"{what} {listen}: cannot listen: {reason}"


def addresses_in_use(wanted: Iterable[tuple[str, str | None]]) -> list[str]:
    """One line per address in ``wanted`` ((what, host:port) pairs; empty ones skipped)
    that cannot be bound now. A check, not a reservation: the real bind can still lose a
    race, and reports it the same way (``ListenError``)."""
    problems: list[str] = []
    for what, listen in wanted:
        if not listen:
            continue
        try:
            host, port = split_listen(listen)
        except ValueError:
            problems.append(f"{what} {listen}: not a host:port address")
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as exc:
            problems.append(_bind_error(what, listen, exc))
    return problems


def _answer(result: tuple[bool, dict[str, Any]]) -> web.Response:
    ok, detail = result
    return web.Response(
        status=200 if ok else 503,
        text=json.dumps({"ok": ok, **detail}),
        content_type="application/json",
    )


class HealthServer:
    def __init__(
        self,
        listen: str,
        *,
        liveness: Probe,
        readiness: Probe,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.listen = listen
        self.registry = registry
        self.host, self.port = split_listen(listen)
        self._liveness = liveness
        self._readiness = readiness
        self._runner: web.AppRunner | None = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return _answer(self._liveness())

    async def _readyz(self, _: web.Request) -> web.Response:
        return _answer(self._readiness())

    async def _metrics(self, _: web.Request) -> web.Response:
        """Collected on the event loop (the collectors read the agent's live state), written
        out on a worker thread: 1,000 applications are 13,000 series."""
        families = list(self.registry.collect())
        resp = web.Response(body=await asyncio.to_thread(render_families, families))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ListenError(_bind_error("health endpoint", self.listen, exc)) from None
        log.info(
            "health_listening",
            msg=f"health endpoint listening on {self.host}:{self.port}",
            listen=f"{self.host}:{self.port}",
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
