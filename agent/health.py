"""/healthz, /readyz and /metrics over aiohttp.

Liveness follows Patroni: the control loop ran within the last ttl, not "the process is
up" (a wedged loop in a live process must be restarted). Readiness is the mesh view:
connected, buckets ready, and a mesh write succeeded within the last ttl.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = structlog.get_logger("agent.health")

Probe = Callable[[], tuple[bool, dict[str, Any]]]


def _answer(result: tuple[bool, dict[str, Any]]) -> web.Response:
    ok, detail = result
    return web.Response(
        status=200 if ok else 503,
        text=json.dumps({"ok": ok, **detail}),
        content_type="application/json",
    )


class HealthServer:
    def __init__(self, listen: str, *, liveness: Probe, readiness: Probe) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        self._liveness = liveness
        self._readiness = readiness
        self._runner: web.AppRunner | None = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return _answer(self._liveness())

    async def _readyz(self, _: web.Request) -> web.Response:
        return _answer(self._readiness())

    async def _metrics(self, _: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("health endpoint listening", listen=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
