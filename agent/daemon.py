"""``harmony-agent run``: the composition root. Everything is built here, in the order it
starts, and stopped in ``shutdown``, in the order written there (after kopf's
``running.py`` and Patroni's ``Patroni.__init__``).

Start: embedded nats-server (mTLS, accounts, its loopback system user: ``agent.security``)
-> connection (TLS, credentials, private inbox) -> mesh (buckets, descriptor, stores) ->
topology and its fence (after stopping a previous incarnation's leftovers) -> session
thread (its own connection with the same options; its renewals feed the fence directly) ->
lease manager (and the ``harmony-leases`` view it publishes) -> controller (its first
snapshot of Applications and marks before any runner) -> command plane -> status, summary,
control loop -> trust-sync (signed entries -> bundle, eviction) and cert-renew (leaves, the
expiry gauge).

Stop (SIGTERM): command plane -> controller (every workload stops, bounded by its
stop_timeout, *while the session keeps renewing*; then every lease is released or handed
over) -> lease manager -> lease view flushed -> control loop, summary, status, trust-sync,
cert-renew -> session close (``closed`` in every store) -> fence -> connection -> embedded
server. The budget is the configuration's (``Timing.shutdown_budget``), not a fixed
per-step grace, and the session is never closed before the workloads are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any, cast

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError

from agent import __version__, app_metrics, metrics, sdnotify
from agent.commands import CommandServer
from agent.commands.models import MAX_REQUEST_BYTES
from agent.config import AgentConfig
from agent.controller.controller import Controller
from agent.controller.statefile import StateFile, stop_leftovers
from agent.health import HealthServer
from agent.security import (
    RedactingEventPublisher,
    SiteSecurity,
    connection_options,
    embedded_spec,
    system_password,
)
from agent.supervisor import Supervisor
from mesh.bootstrap import Mesh, MeshMismatch, bind_mesh, ensure_mesh, ensure_store
from mesh.clock import boottime, now_rfc3339, wall_iso
from mesh.connection import MeshConnection
from mesh.embedded import EmbeddedServer, InsecureListener, PortInUse
from mesh.leases import LeaseManager
from mesh.mirror import LeaseMirror
from mesh.names import SUMMARY_REFRESH_S, agent_key, status_subject
from mesh.redact import redact_value
from mesh.session import SessionThread, SessionView
from topologies.base import Topology
from topologies.build import build_topology
from topologies.capabilities import KubernetesApi
from topologies.supervisor import FenceSupervisor

log = structlog.get_logger("agent.daemon")


class StartupError(RuntimeError):
    """The agent cannot start with this configuration; one line, exit 2."""


class Agent:
    """One running agent; ``run()`` builds, supervises and stops everything."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.timing = config.timing
        self.started_at = now_rfc3339()
        self.started_mono = time.monotonic()
        self.supervisor = Supervisor()
        self.connection = MeshConnection(connection_options(config))
        with_system_user = config.nats.embedded and config.nats.accounts is not None
        self.security = SiteSecurity(
            config,
            connection=self.connection,
            system_password=system_password() if with_system_user else None,
        )
        self.stop_event = asyncio.Event()
        self.embedded: EmbeddedServer | None = None
        self.mesh: Mesh | None = None
        self.topology: Topology | None = None
        self.fence: FenceSupervisor | None = None
        self.statefile = StateFile(config.state_dir)
        self.session: SessionThread | None = None
        self.leases: LeaseManager | None = None
        self.mirror: LeaseMirror | None = None
        self.controller: Controller | None = None
        self.commands: CommandServer | None = None
        self.last_cycle: float | None = None
        self.started = False
        """Every component is up (readiness waits for it)."""

    # --- facts -----------------------------------------------------------------------------

    @property
    def ttl(self) -> float:
        return self.config.lease.ttl

    def in_quorum(self) -> bool:
        return self.session is not None and self.session.view().valid(boottime())

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = None if self.last_cycle is None else time.monotonic() - self.last_cycle
        starting = self.last_cycle is None and time.monotonic() - self.started_mono < 2 * self.ttl
        ok = ((age is not None and age < self.ttl) or starting) and self.supervisor.healthy()
        return ok, {"last_cycle_age": age, "failure": self.supervisor.failure}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail = {
            "started": self.started,
            "connected": self.connection.connected,
            "buckets": self.mesh is not None,
            "in_quorum": self.in_quorum(),
        }
        return all(detail.values()), detail

    def health(self) -> dict[str, Any]:
        ready, detail = self.readiness()
        return {"ready": ready, "healthy": self.liveness()[0], **detail}

    def summary(self) -> dict[str, Any]:
        """``agent.<site>.<node>``: small, written on change (liveness is the session's)."""
        return {
            "agent": self.config.agent_id,
            "site": self.config.site,
            "node": self.config.node,
            "version": __version__,
            "started_at": self.started_at,
            "topology": self.config.topology.kind,
            "ttl": self.ttl,
            "health": self.health(),
            "state": "alive",
            "warnings": self.security.last_warnings(),
        }

    def live_status(self) -> dict[str, Any]:
        view = self.session.view() if self.session else None
        now = boottime()
        stores = {}
        if view is not None:
            for name, s in view.stores.items():
                stores[name] = {
                    "live": s.live,
                    "fresh_for": round(max(0.0, s.fresh_until - now), 3),
                    "error": s.error or None,
                }
        body: dict[str, Any] = {
            "ok": True,
            "id": self.config.agent_id,
            **self.summary(),
            "uptime": round(time.monotonic() - self.started_mono, 3),
            "server": self.connection.server_url_redacted,
            "session": {
                "valid_for": round(max(0.0, view.deadline() - now), 3) if view else 0.0,
                "stores": stores,
            },
            "tasks": self.supervisor.names,
        }
        if self.controller is not None:
            body.update(self.controller.status())
        body.update(self.security.status())
        # Viewers may read this: no password, key or URL credential, whatever a field holds.
        redacted: dict[str, Any] = redact_value(body)
        return redacted

    # --- start -----------------------------------------------------------------------------

    async def _connect_extra(self) -> Client:
        """A second connection with the same identity, for the session thread."""
        extra = MeshConnection(self.connection.options)
        await extra.connect()
        return extra.nc

    async def _bind(self) -> Mesh:
        cfg = self.config
        js = self.connection.js
        backoff = 0.2
        while True:
            try:
                if cfg.mesh.bootstrap:
                    default = None if cfg.mesh.stores else await self._default_stores()
                    return await ensure_mesh(
                        js, cfg.mesh.replicas, stores=cfg.mesh.stores, default_stores=default
                    )
                return await bind_mesh(js, stores=cfg.mesh.stores)
            except MeshMismatch as exc:
                if cfg.mesh.bootstrap or "mesh init" not in str(exc):
                    raise
                # Under per-identity accounts an admin creates the mesh: wait for it.
                log.warning(
                    "mesh_not_initialised",
                    msg=f"waiting for an admin to initialise the mesh: {exc}",
                    error=str(exc),
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except (NatsError, JsError, TimeoutError, OSError) as exc:
                log.warning(
                    "mesh_not_ready", msg=f"mesh not ready: {exc!r}; retrying", error=repr(exc)
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _default_stores(self) -> list[str] | None:
        """Alone on a non-clustered server, one store named after our site; else nothing
        (the descriptor must exist or ``mesh.stores`` be configured)."""
        # The server's own INFO names its cluster from the first moment; JetStream's INFO
        # may not while its meta group is still forming, and a clustered mesh defaulted
        # to one store would leave a cut-off site in quorum with itself.
        server = getattr(self.connection.nc, "_server_info", None) or {}
        if server.get("cluster") or server.get("connect_urls"):
            return None
        try:
            info = await self.connection.nc.request("$JS.API.INFO", b"", timeout=2.0)
            data = json.loads(info.data)
        except (NatsError, TimeoutError, ValueError):
            return None
        clustered = isinstance(data, dict) and data.get("cluster") not in (None, {})
        return None if clustered else [self.config.site]

    async def _start(self) -> None:
        cfg = self.config
        sup = self.supervisor
        if cfg.nats.embedded:
            self.embedded = EmbeddedServer(
                embedded_spec(cfg, self.security.system_password),
                cfg.state_dir / "nats" / "nats-server.conf",
            )
            self.security.embedded = self.embedded
            sup.spawn("nats-server", self.embedded.run())
            await self.embedded.wait_started()

        self.connection.on_state_change = self._connection_changed
        await self.connection.connect()
        self.mesh = mesh = await self._bind()

        self.topology = topology = build_topology(cfg.topology)
        if KubernetesApi in topology.capabilities():
            self.security.kube = cast(KubernetesApi, topology)  # the bundle ConfigMap
        fence = getattr(topology, "fence", None)
        if isinstance(fence, FenceSupervisor):
            await asyncio.to_thread(stop_leftovers, self.statefile)  # logs each one
            self.fence = fence
            await fence.start()
            if fence.proc is not None:
                self.statefile.set_fence(fence.proc.pid)
            sup.spawn("fence", fence.run())
        sup.spawn("statefile", self.statefile.run())

        self.session = session = SessionThread(
            self._connect_extra,
            mesh.stores,
            cfg.site,
            cfg.node,
            ttl=self.ttl,
            margin=self.timing.margin,
            stall_limit=self.timing.stall_limit,
            on_renewed=self._feed_fence,
        )
        await session.start()
        sup.spawn("session", self._watch_session(session))

        self.leases = leases = LeaseManager(
            self.connection.nc,
            session,
            mesh.stores,
            step=self.timing.rank_step,
            window=self.timing.handover_window,
            cas_timeout=self.timing.cas_timeout,
            recreate=self._recreate_store if cfg.mesh.bootstrap else None,
        )
        await self._retry("lease stores", leases.start)
        sup.spawn("leases", leases.run())
        if mesh.lease_view is not None:
            self.mirror = mirror = LeaseMirror(mesh.lease_view, cfg.site, cfg.node)
            leases.on_acquired.append(mirror.acquired)
            leases.on_lost.append(mirror.lost)
            sup.spawn("lease-view", mirror.run())

        events = RedactingEventPublisher(self.connection.nc, cfg.site, cfg.node)
        holders = app_metrics.HolderLog(leases)  # failovers and handovers, per application
        self.controller = ctl = Controller(
            nc=self.connection.nc,
            state=mesh.state,
            site=cfg.site,
            node=cfg.node,
            state_dir=cfg.state_dir,
            timing=self.timing,
            max_failures=cfg.controller.max_failures,
            leases=leases,
            alive=leases.agent_alive,
            agents=leases.live_agents,
            holder=holders.holder_of,
            events=events,
            topology=topology,
            statefile=self.statefile,
        )
        leases.on_acquired.append(holders.acquired)
        leases.on_acquired.append(ctl.lease_changed)
        leases.on_lost.append(ctl.lease_changed)
        leases.on_renewed.append(ctl.renewed)
        leases.on_observed.append(ctl.lease_observed)
        await self._retry("controller", ctl.start)
        sup.spawn("controller", ctl.run())

        self.commands = CommandServer(
            self.connection.nc,
            mesh.state,
            site=cfg.site,
            node=cfg.node,
            failover=ctl.failover,
            handler_timeout=self.timing.handler_timeout,
            state_dir=cfg.state_dir,
        )
        await self.commands.start()
        ctl.on_held_changed.append(self.commands.sync_apps)

        sup.spawn("status-responder", self.serve_status())
        sup.spawn("summary", self.publish_summary())
        sup.spawn("control-loop", self.control_loop())
        if cfg.trust.bundle_file is not None:
            sup.spawn("trust-sync", self.security.run_trust_sync(mesh.trust))
        sup.spawn("cert-renew", self.security.renew_forever())
        self.started = True
        await self._write_summary()
        log.info(
            "agent_ready",
            msg=f"agent {cfg.agent_id} ready (lease stores: {', '.join(mesh.stores)})",
            tasks=sup.names,
            stores=mesh.stores,
        )
        sdnotify.ready(f"ready: {cfg.agent_id} in the mesh")

    async def _retry(self, what: str, start: Any) -> None:
        """Start-up steps wait out a mesh that is not there yet (a site booting while cut
        off, JetStream without quorum) instead of failing the agent; SIGTERM cancels."""
        backoff = 0.5
        while True:
            try:
                await start()
                return
            except (TimeoutError, NatsError, JsError, OSError) as exc:
                log.warning(
                    "start_retry",
                    msg=f"{what} could not start: {exc!r}; retrying in {backoff:g}s",
                    what=what,
                    error=repr(exc),
                    backoff=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _recreate_store(self, store: str) -> None:
        """A lease store vanished (deleted by hand, its disk lost): create it again. Tokens
        keep increasing (terms are floored at the wall clock) and contenders ignore a
        recreated store for a ttl (docs/leases.md)."""
        await ensure_store(self.connection.js, store)

    def _feed_fence(self, view: SessionView) -> None:
        """Session thread: hand the fence the deadline it may follow without us."""
        fence = self.fence
        if fence is not None:
            groups = {g: view.deadline(dict(s)) for g, s in fence.groups().items()}
            fence.session_deadline(view.anchored_deadline(), groups)

    async def _watch_session(self, session: SessionThread) -> None:
        """A supervised task that ends (failing the agent) if the session thread dies."""
        await session.join()
        raise RuntimeError("the session thread ended")

    def _connection_changed(self, up: bool) -> None:
        if not up:
            metrics.MESH_DISCONNECTS.inc()

    # --- tasks -----------------------------------------------------------------------------

    async def control_loop(self) -> None:
        """Prove the main loop runs (health, the session watchdog) and refresh gauges."""
        interval = self.timing.control_interval
        while True:
            if self.session is not None:
                self.session.stamp()
            self.last_cycle = time.monotonic()
            sdnotify.watchdog()  # systemd WatchdogSec: a wedged loop stops these pings
            metrics.LOOP_CYCLES.inc()
            await asyncio.sleep(interval)

    async def _write_summary(self) -> bool:
        assert self.mesh is not None
        key = agent_key(self.config.site, self.config.node)
        body = {**self.summary(), "time": now_rfc3339()}
        try:
            await self.mesh.state.put(key, json.dumps(body).encode())
        except (NatsError, JsError, TimeoutError, OSError) as exc:
            log.debug("summary_not_written", msg=f"summary not written: {exc!r}", error=repr(exc))
            return False
        return True

    async def publish_summary(self) -> None:
        """Write ``agent.<site>.<node>`` when it changes (and every minute, for humans)."""
        last: dict[str, Any] | None = None
        written = 0.0
        while True:
            body = self.summary()
            due = body != last or time.monotonic() - written > SUMMARY_REFRESH_S
            if due and await self._write_summary():
                last, written = body, time.monotonic()
            await asyncio.sleep(1.0)

    async def serve_status(self) -> None:
        nc = self.connection.nc
        sub = await nc.subscribe(status_subject(self.config.site, self.config.node))
        try:
            async for msg in sub.messages:
                await self._answer_status(msg)
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def _answer_status(self, msg: Msg) -> None:
        if not msg.reply:
            return
        if len(msg.data) > MAX_REQUEST_BYTES:
            body: dict[str, Any] = {"ok": False, "error": "request too large"}
        else:
            body = self.live_status()
        with contextlib.suppress(NatsError):
            await msg.respond(json.dumps(body).encode())

    # --- stop ------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop in the written order (module docstring); never close the session first."""
        stop_timeouts = []
        if self.controller is not None:
            for r in self.controller.runners.values():
                stop_timeouts.append(
                    float(getattr(getattr(r.interpret, "spec", None), "stop_timeout", 5.0))
                )
        budget = self.timing.shutdown_budget(stop_timeouts)
        log.info(
            "agent_stopping",
            msg=f"stopping: workloads, leases, session within {budget:.1f}s",
            budget=round(budget, 1),
            deadline=wall_iso(boottime() + budget),
        )
        # systemd: deactivating from here on (no watchdog); TimeoutStopSec bounds the rest.
        sdnotify.stopping(self.supervisor.failure or "stopping: workloads, leases, session")
        sup = self.supervisor
        if self.commands is not None:
            await self.commands.stop()
        clean = True
        if self.controller is not None:
            await sup.cancel("controller")
            try:
                clean = await asyncio.wait_for(self.controller.shutdown(), budget)
            except TimeoutError:
                clean = False
                log.error(
                    "shutdown_budget_exceeded",
                    msg=f"workloads did not stop within the shutdown budget ({budget:.1f}s)",
                    budget=budget,
                )
        if self.leases is not None:
            await sup.cancel("leases")
            await self.leases.stop(release_budget=self.timing.release_budget)
        if self.mirror is not None:
            await self.mirror.flush(timeout=1.0)  # the view shows our releases, if it can
            await sup.cancel("lease-view")
        for name in (
            "control-loop",
            "summary",
            "status-responder",
            "trust-sync",
            "cert-renew",
            "session",
        ):
            await sup.cancel(name)
        if self.mesh is not None:
            with contextlib.suppress(Exception):
                closed = {**self.summary(), "state": "closed", "time": now_rfc3339()}
                key = agent_key(self.config.site, self.config.node)
                await asyncio.wait_for(self.mesh.state.put(key, json.dumps(closed).encode()), 2.0)
        if self.session is not None:
            # ``closed`` frees our leases at once: written only when nothing of ours runs.
            # Otherwise the session simply lapses (a contender waits a ttl, the fence kills
            # whatever is left at the deadline): slower, never overlapping.
            if not clean:
                log.error(
                    "session_left_to_lapse",
                    msg="a workload may still run: letting the session lapse, not closing it",
                )
            await self.session.close(write=clean)
        if self.fence is not None:
            await sup.cancel("fence")
            await self.fence.close()
        await sup.cancel("statefile")
        with contextlib.suppress(OSError):
            self.statefile.save()
        await self.connection.close()
        await sup.cancel_all()
        if self.embedded is not None:
            await self.embedded.stop()

    async def run(self) -> int:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)

        health: HealthServer | None = None
        if cfg.health.listen:
            health = HealthServer(
                cfg.health.listen,
                liveness=self.liveness,
                readiness=self.readiness,
                registry=metrics.registry_for(self),
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
                await self.shutdown()
                return 0
            exc = starting.exception()
            if isinstance(exc, MeshMismatch | PortInUse | InsecureListener):
                await self.shutdown()
                raise StartupError(str(exc))
            if exc is not None:
                log.error("startup_failed", msg=f"startup failed: {exc!r}", error=repr(exc))
                await self.shutdown()
                return 1
            code = await self.supervisor.run(self.stop_event)
            await self.shutdown()
            log.info(
                "agent_stopped",
                msg=f"agent stopped (exit {code})",
                exit_code=code,
                reason=self.supervisor.failure or "signal",
            )
            return code
        finally:
            if health is not None:
                await health.stop()

    def _request_stop(self, sig: signal.Signals) -> None:
        log.info(
            "stop_requested",
            msg=f"stop requested by {sig.name}",
            signal=sig.name,
            pid=os.getpid(),
        )
        self.stop_event.set()
