"""``harmony-agent run``: wire the mesh, the session, health and the control loop together.

Start-up order matters: the embedded nats-server (if any) first, then the connection,
bucket bootstrap and session, then the control loop; shutdown runs the other way round so
that workloads stop and leases are released while the mesh is still reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError

from agent import __version__, metrics
from agent.commands.models import MAX_REQUEST_BYTES
from agent.config import AgentConfig
from agent.health import HealthServer
from agent.supervisor import Supervisor
from agent.trust_sync import sync_bundle
from mesh.bootstrap import Buckets, ensure_mesh
from mesh.connection import ConnectionOptions, MeshConnection, TlsFiles
from mesh.embedded import EmbeddedServer, ServerSpec
from mesh.names import agent_key, status_subject
from mesh.session import RenewResult, Session, now_rfc3339

log = structlog.get_logger("agent.daemon")

CycleHook = Callable[[], Awaitable[None]]


def connection_options(config: AgentConfig) -> ConnectionOptions:
    tls = config.nats.tls
    return ConnectionOptions(
        servers=tuple(config.nats.servers),
        name=f"harmony-agent {config.agent_id}",
        tls=TlsFiles(tls.ca_file, tls.cert_file, tls.key_file) if tls else None,
        credentials=config.nats.credentials,
        connect_timeout=config.nats.connect_timeout,
        # Detect a dead server well within one ttl so the client fails over in time.
        ping_interval=max(1.0, config.lease.ttl / 3),
    )


def embedded_spec(config: AgentConfig) -> ServerSpec:
    n = config.nats
    return ServerSpec(
        name=f"{config.site}-{config.node}",
        store_dir=config.state_dir / "nats" / "jetstream",
        listen=n.listen,
        monitor_listen=n.monitor_listen or None,
        cluster_name=n.cluster_name,
        cluster_listen=n.cluster_listen,
        routes=tuple(n.routes),
        tags=(f"site:{config.site}",),
    )


class Agent:
    """One running agent. Owns its connection, session and supervised tasks."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = now_rfc3339()
        self.started_mono = time.monotonic()
        self.supervisor = Supervisor()
        self.connection = MeshConnection(connection_options(config))
        self.embedded: EmbeddedServer | None = None
        self.buckets: Buckets | None = None
        self.session: Session | None = None
        self.last_cycle: float | None = None
        self.cycle_hooks: list[CycleHook] = []
        self.status_extensions: list[Callable[[], dict[str, Any]]] = []
        """Extra live-status fields (the controller adds its applications here)."""
        self.stop_event = asyncio.Event()

    # --- facts -----------------------------------------------------------------------------

    @property
    def ttl(self) -> float:
        return self.config.lease.ttl

    def in_quorum(self) -> bool:
        return self.session is not None and self.session.in_quorum()

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = None if self.last_cycle is None else time.monotonic() - self.last_cycle
        # Before the first cycle we are starting up, which counts as alive for one ttl.
        ok = (age is not None and age < self.ttl) or (
            self.last_cycle is None and time.monotonic() - self.started_mono < 2 * self.ttl
        )
        return ok, {"last_cycle_age": age}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail = {
            "connected": self.connection.connected,
            "buckets": self.buckets is not None,
            "in_quorum": self.in_quorum(),
        }
        return all(detail.values()), detail

    def health(self) -> dict[str, Any]:
        ready, detail = self.readiness()
        return {"ready": ready, "healthy": self.liveness()[0], **detail}

    def heartbeat_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "site": self.config.site,
            "node": self.config.node,
            "version": __version__,
            "started_at": self.started_at,
            "topology": self.config.topology.kind,
            "health": self.health(),
        }
        for extend in self.status_extensions:
            payload.update(extend())
        return payload

    def live_status(self) -> dict[str, Any]:
        s = self.session
        return {
            "ok": True,
            "id": self.config.agent_id,
            **self.heartbeat_payload(),
            "uptime": round(time.monotonic() - self.started_mono, 3),
            "server": self.connection.server_url,
            "session": {
                "epoch": s.epoch if s else None,
                "valid_for": round(s.remaining(), 3) if s else 0.0,
                "ttl": self.ttl,
            },
            "tasks": self.supervisor.names,
        }

    # --- tasks ----------------------------------------------------------------------------

    async def _bootstrap(self) -> Buckets:
        backoff = 0.2
        while True:
            try:
                return await ensure_mesh(self.connection.js, self.config.mesh.replicas)
            except (NatsError, JsError, TimeoutError, OSError) as exc:
                log.warning("mesh bootstrap failed; retrying", error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _on_renew(self, result: RenewResult, latency: float) -> None:
        if result is RenewResult.OK:
            metrics.HEARTBEAT_SECONDS.observe(latency)
        else:
            metrics.HEARTBEAT_FAILURES.labels(result=result.value).inc()

    async def control_loop(self) -> None:
        """One cycle per tick: refresh gauges, then give each component its decision turn."""
        interval = min(1.0, self.ttl / 3)
        while True:
            for hook in self.cycle_hooks:
                await hook()
            self.last_cycle = time.monotonic()
            metrics.LOOP_CYCLES.inc()
            metrics.MESH_CONNECTED.set(1 if self.connection.connected else 0)
            metrics.IN_QUORUM.set(1 if self.in_quorum() else 0)
            metrics.READY.set(1 if self.readiness()[0] else 0)
            await asyncio.sleep(interval)

    async def serve_status(self) -> None:
        nc = self.connection.nc
        subject = status_subject(self.config.site, self.config.node)
        sub = await nc.subscribe(subject)
        try:
            async for msg in sub.messages:
                await self._answer_status(msg)
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def _answer_status(self, msg: Msg) -> None:
        import json

        if not msg.reply:
            return
        if len(msg.data) > MAX_REQUEST_BYTES:
            body: dict[str, Any] = {"ok": False, "error": "request too large"}
        else:
            body = self.live_status()
        with contextlib.suppress(NatsError):
            await msg.respond(json.dumps(body).encode())

    # --- lifecycle ------------------------------------------------------------------------

    async def _start(self) -> None:
        cfg = self.config
        if cfg.nats.embedded:
            self.embedded = EmbeddedServer(
                embedded_spec(cfg), cfg.state_dir / "nats" / "nats-server.conf"
            )
            self.supervisor.spawn("nats-server", self.embedded.run())
            await self.embedded.wait_started()

        self.connection.on_state_change = self._connection_changed
        await self.connection.connect()
        self.supervisor.on_shutdown("mesh-close", self.connection.close)
        self.buckets = await self._bootstrap()
        self.session = Session(
            self.buckets.state,
            agent_key(cfg.site, cfg.node),
            cfg.agent_id,
            ttl=self.ttl,
            margin=cfg.lease.effective_margin,
            payload=self.heartbeat_payload,
        )
        self.session.on_renew.append(self._on_renew)
        await self.session.open()
        self.supervisor.on_shutdown("session-close", self.session.close)
        self.supervisor.spawn("session", self.session.run())
        self.supervisor.spawn("status-responder", self.serve_status())
        # Issue 5: the application controller (leases, workloads, reconcile); see agent/controller.
        from agent.controller import attach as attach_controller

        self.controller = await attach_controller(self)
        # Issue 6: the command plane (harmony.cmd.<site>.<node>.* and, for held applications,
        # harmony.cmd.app.<name>.*); see agent/commands. Stopped before the controller.
        from agent.commands import CommandServer

        self.commands = CommandServer(
            self.connection.nc,
            self.buckets.state,
            site=cfg.site,
            node=cfg.node,
            failover=self.controller.failover,
        )
        await self.commands.start()
        self.controller.on_held_changed.append(self.commands.sync_apps)
        self.supervisor.on_shutdown("commands-stop", self.commands.stop)
        self.supervisor.spawn("control-loop", self.control_loop())
        if cfg.trust.bundle_file is not None:
            self.supervisor.spawn(
                "trust-sync",
                sync_bundle(self.buckets.trust, cfg.trust.bundle_file, server_pid=self._server_pid),
            )
        log.info("agent ready", tasks=self.supervisor.names)

    def _server_pid(self) -> int | None:
        proc = self.embedded.process if self.embedded else None
        return proc.pid if proc is not None and proc.returncode is None else None

    def _connection_changed(self, up: bool) -> None:
        metrics.MESH_CONNECTED.set(1 if up else 0)
        if not up:
            metrics.MESH_DISCONNECTS.inc()

    async def run(self) -> int:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        metrics.AGENT_INFO.info({"version": __version__, "site": cfg.site, "node": cfg.node})
        metrics.UPTIME.set_function(lambda: time.monotonic() - self.started_mono)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)

        health: HealthServer | None = None
        if cfg.health.listen:
            health = HealthServer(
                cfg.health.listen, liveness=self.liveness, readiness=self.readiness
            )
            await health.start()
        try:
            starting = asyncio.create_task(self._start(), name="startup")
            stopper = asyncio.create_task(self.stop_event.wait())
            await asyncio.wait([starting, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                await self.supervisor.shutdown()
                return 0
            if starting.exception() is not None:
                log.error("startup failed", error=repr(starting.exception()))
                await self.supervisor.shutdown()
                return 1
            code = await self.supervisor.run(self.stop_event)
            log.info("agent stopped", exit_code=code, reason=self.supervisor.failure or "signal")
            return code
        finally:
            if health is not None:
                await health.stop()

    def _request_stop(self, sig: signal.Signals) -> None:
        log.info("stopping", signal=sig.name, pid=os.getpid())
        self.stop_event.set()
