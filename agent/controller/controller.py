"""The application controller: desired state in, leases and workloads out.

Wiring (``attach``): one ``LeaseManager`` on the agent's session; one KV watch on all of
``harmony-state`` feeding the desired Applications (``app.<name>``), the peers' instances
(``agent.<site>.<node>`` heartbeats) and the operator marks (``drain.<site>``,
``fence.<app>``); one ``AppRunner`` per application (see ``runner.py``). The agent's
control-loop tick wakes every runner; watch changes and lease callbacks wake the runners
concerned at once, so reactions do not wait for the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from nats.errors import Error as NatsError
from nats.js.errors import Error as JsError
from pydantic import ValidationError

from agent.application import Application, Trait
from agent.commands.marks import DRAIN_PREFIX, FENCE_PREFIX
from agent.commands.models import Reply
from agent.controller.events import EventPublisher
from agent.controller.peers import PeerTable
from agent.controller.runner import AppRunner
from agent.controller.statefile import StateFile, stop_leftovers
from mesh.leases import LeaseManager
from mesh.names import STATE_BUCKET
from mesh.watch import Change, KvWatch
from topologies.base import Topology

if TYPE_CHECKING:
    from agent.daemon import Agent

log = structlog.get_logger("agent.controller")

APP_PREFIX = "app."
AGENT_PREFIX = "agent."
ANNOUNCE_PREFIX = "harmony.instances."
"""Core subject ``harmony.instances.<site>.<node>``: SplitBrainAllowed instance reports."""


class Controller:
    def __init__(
        self,
        *,
        site: str,
        node: str,
        state_dir: Path,
        ttl: float,
        max_failures: int,
        leases: LeaseManager,
        events: EventPublisher,
        topology: Topology,
        clock: Callable[[], float],
    ) -> None:
        self.site = site
        self.node = node
        self.agent_id = f"{site}/{node}"
        self.state_dir = state_dir
        self.ttl = ttl
        self.interval = min(1.0, ttl / 3)
        self.max_failures = max_failures
        self.cooldown = max(10.0, 5 * ttl)
        """After max_failures this agent stays out of the race so another site can try."""
        self.healthy_after = max(5.0, 2 * ttl)
        """A run this long resets the consecutive-failure count."""
        self.leases = leases
        self.events = events
        self.topology = topology
        self.clock = clock
        self.statefile = StateFile(state_dir)
        self.peers = PeerTable(self.agent_id, ttl, clock)
        self.desired: dict[str, Application] = {}
        self.invalid: dict[str, str] = {}
        self.drained_sites: set[str] = set()
        self.fenced_apps: set[str] = set()
        self.runners: dict[str, AppRunner] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.watch: KvWatch | None = None
        self.on_held_changed: list[Callable[[frozenset[str]], Any]] = []
        self._held_seen: frozenset[str] = frozenset()
        self.stopping = False
        self._announce_sub: Any = None
        self._bg: set[asyncio.Task[None]] = set()
        self._held_lock = asyncio.Lock()

    # --- facts for the runners --------------------------------------------------------------

    def is_fenced(self, app: str) -> bool:
        return app in self.fenced_apps

    def is_drained(self) -> bool:
        return self.site in self.drained_sites

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, js: Any) -> None:
        """Stop leftovers of a previous incarnation, then watch and run."""
        for sentence in await asyncio.to_thread(stop_leftovers, self.statefile):
            await self.events.publish("leftover-stopped", sentence.split(":", 1)[0], None)
        self.leases.on_acquired.append(self._lease_acquired)
        self.leases.on_lost.append(self._lease_lost)
        self.leases.on_deadline.append(self._feed_deadline)
        nc = self.events.nc
        self._announce_sub = await nc.subscribe(ANNOUNCE_PREFIX + ">", cb=self._on_announce)
        self.watch = KvWatch(js, STATE_BUCKET, ">", self._on_state, heartbeat=1.0)
        await self.watch.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.watch.ready.wait(), 10.0)
        log.info("controller started", apps=sorted(self.desired), agent=self.agent_id)

    def tick(self) -> None:
        """Wake every runner (the agent's control-loop cycle)."""
        for runner in self.runners.values():
            runner.wake.set()
        self._reap()

    async def cycle_hook(self) -> None:
        self.tick()
        await self._announce()
        await self._sync_held()

    async def stop_watch(self) -> None:
        """Undo a failed ``start`` so that it can be retried."""
        if self.watch is not None:
            await self.watch.stop()
            self.watch = None
        if self._announce_sub is not None:
            with contextlib.suppress(Exception):
                await self._announce_sub.unsubscribe()
            self._announce_sub = None
        for lst, cb in (
            (self.leases.on_acquired, self._lease_acquired),
            (self.leases.on_lost, self._lease_lost),
            (self.leases.on_deadline, self._feed_deadline),
        ):
            with contextlib.suppress(ValueError):
                lst.remove(cb)  # type: ignore[arg-type]

    async def shutdown(self) -> None:
        """SIGTERM: stop every workload and release every lease while the mesh is up."""
        self.stopping = True
        runners = list(self.runners.values())
        await asyncio.gather(*(r.shutdown() for r in runners), return_exceptions=True)
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self.watch is not None:
            await self.watch.stop()
        if self._announce_sub is not None:
            with contextlib.suppress(Exception):
                await self._announce_sub.unsubscribe()
        log.info("controller stopped", agent=self.agent_id)

    # --- inputs -----------------------------------------------------------------------------

    def _on_state(self, change: Change) -> None:
        key = change.key
        if key.startswith(APP_PREFIX):
            self._on_app(key[len(APP_PREFIX) :], change.value)
        elif key.startswith(AGENT_PREFIX):
            for app in self.peers.feed(key, change.value):
                self._wake(app)
        elif key.startswith(DRAIN_PREFIX):
            site = key[len(DRAIN_PREFIX) :]
            (self.drained_sites.add if change.value is not None else self.drained_sites.discard)(
                site
            )
            if site == self.site:
                self.tick()
        elif key.startswith(FENCE_PREFIX):
            app = key[len(FENCE_PREFIX) :]
            (self.fenced_apps.add if change.value is not None else self.fenced_apps.discard)(app)
            self._wake(app)

    async def _on_announce(self, msg: Any) -> None:
        key = "core:" + str(msg.subject)
        back = not self.peers.knows(key)
        for app in self.peers.feed(key, bytes(msg.data)):
            self._wake(app)
        if back and not str(msg.subject).endswith(f".{self.site}.{self.node}"):
            # A peer we had not heard from (new, or back from a partition): answer with our
            # own instances at once, so both sides of a healed partition learn of each other
            # in one round trip instead of one cycle each.
            await self._announce()

    def announce_soon(self) -> None:
        """A runner changed state: tell the peers now rather than at the next tick."""
        if not self.stopping:
            task = asyncio.get_running_loop().create_task(self._announce())
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _announce(self) -> None:
        """Report SplitBrainAllowed instances on the core subject (see ``peers.py``)."""
        ap = [
            r.report().as_dict()
            for name, r in self.runners.items()
            if not r.consistent
            and name in self.desired
            and self.site in self.desired[name].spec.placement.sites
        ]
        if not ap:
            return
        body = {"agent": self.agent_id, "site": self.site, "state": "alive", "instances": ap}
        with contextlib.suppress(Exception):
            await self.events.nc.publish(
                f"{ANNOUNCE_PREFIX}{self.site}.{self.node}", json.dumps(body).encode()
            )

    def _on_app(self, name: str, value: bytes | None) -> None:
        if "." in name:
            return
        if value is None:
            self.desired.pop(name, None)
            self.invalid.pop(name, None)
            log.info(f"{name}: application deleted", app=name)
        else:
            try:
                app = Application.from_json(value)
            except (ValidationError, ValueError) as exc:
                # Keep the last good spec: a bad write must not stop a running application.
                self.invalid[name] = str(exc).splitlines()[0]
                log.error(
                    f"{name}: invalid application ignored", app=name, error=self.invalid[name]
                )
                return
            self.invalid.pop(name, None)
            if self.desired.get(name) != app:
                log.info(f"{name}: application changed", app=name)
            self.desired[name] = app
        self._ensure_runner(name)
        self._wake(name)

    def _ensure_runner(self, name: str) -> None:
        if self.stopping:
            return
        runner = self.runners.get(name)
        if runner is not None and not runner.done:
            return
        runner = AppRunner(name, self)
        self.runners[name] = runner
        self.tasks[name] = asyncio.create_task(runner.run(), name=f"app:{name}")

    def _reap(self) -> None:
        for name, runner in list(self.runners.items()):
            task = self.tasks.get(name)
            if runner.done and task is not None and task.done():
                del self.runners[name]
                del self.tasks[name]

    def _wake(self, app: str) -> None:
        runner = self.runners.get(app)
        if runner is not None:
            runner.wake.set()

    def _lease_acquired(self, name: str, token: int, deadline: float) -> None:
        del token, deadline
        self._wake(name)
        self._held_changed_soon()

    def _lease_lost(self, name: str, token: int, why: str) -> None:
        del token, why
        self._wake(name)
        self._held_changed_soon()

    def _held_changed_soon(self) -> None:
        """Tell the command plane at once, so only the holder serves the app subject."""
        if self.on_held_changed and not self.stopping:
            task = asyncio.get_running_loop().create_task(self._sync_held())
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _sync_held(self) -> None:
        async with self._held_lock:
            held = frozenset(self.leases.held())
            if held == self._held_seen:
                return
            self._held_seen = held
            for cb in self.on_held_changed:
                try:
                    result = cb(held)
                    if asyncio.iscoroutine(result):
                        await result
                except Exception as exc:
                    log.warning("held-applications callback failed", error=repr(exc))

    def _feed_deadline(self, deadline: float) -> None:
        """Each successful session renewal moves the guard deadline of held CP workloads."""
        held = self.leases.held()
        for name, runner in self.runners.items():
            if runner.consistent and name in held and runner.interpret is not None:
                runner.interpret.extend_deadline(deadline)

    # --- planned failover (command plane) ---------------------------------------------------

    async def failover(self, app: str, to_site: str | None) -> Reply:
        runner = self.runners.get(app)
        spec = self.desired.get(app)
        if runner is None or spec is None:
            return Reply.failure(f"{self.agent_id} does not run {app!r}")
        if app not in self.leases.held():
            return Reply.failure(f"{self.agent_id} does not hold {app!r} (any more)")
        if spec.spec.trait is not Trait.STATEFUL:
            return Reply.failure(f"{app} is stateless: every eligible site runs it already")
        sites = spec.spec.placement.sites
        if to_site is not None:
            if to_site not in sites:
                return Reply.failure(f"site {to_site!r} is not in {app}'s placement {sites}")
            if to_site == self.site:
                return Reply.failure(f"{app} already runs on {self.site}")
            candidates = [to_site]
        else:
            candidates = [s for s in sites if s != self.site and s not in self.drained_sites]
        target = next((s for s in candidates if self.peers.live_agents(s)), None)
        if target is None:
            return Reply.failure(f"no live agent on {', '.join(candidates) or 'any other site'}")
        ok, sentence = await runner.planned_failover(target)
        if not ok:
            return Reply.failure(sentence)
        runner.wake.set()
        return Reply.success(from_agent=self.agent_id, to=target, message=sentence)

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        instances = [
            r.report().as_dict()
            for name, r in sorted(self.runners.items())
            if name in self.desired and self.site in self.desired[name].spec.placement.sites
        ]
        return {"instances": instances}


def _build_topology(agent: Agent) -> Topology:
    from topologies.build import build_topology

    return build_topology(agent.config.topology)


async def attach(agent: Agent) -> Controller:
    """Build the lease manager and controller for a started agent and hook them in.

    Called from ``Agent._start`` after the session is open. Shutdown hooks run last-in
    first-out, so the controller (registered last) stops workloads and releases leases
    before the lease manager stops, the session closes and the connection drains.
    """
    cfg = agent.config
    assert agent.session is not None
    js = agent.connection.js
    # Rank step 0.25 s: wide enough that watch delivery skew between agents on a loaded
    # machine never lets a worse-ranked site win a new or freed lease first.
    leases = LeaseManager(js, agent.session, site=cfg.site, step=0.25)
    events = EventPublisher(agent.connection.nc, cfg.site, cfg.node)
    ctl = Controller(
        site=cfg.site,
        node=cfg.node,
        state_dir=cfg.state_dir,
        ttl=cfg.lease.ttl,
        max_failures=cfg.controller.max_failures,
        leases=leases,
        events=events,
        topology=_build_topology(agent),
        clock=agent.session.clock,
    )
    # An agent may boot while its site is cut off or JetStream has no quorum: keep trying
    # (SIGTERM cancels start-up) instead of exiting, since nothing can run without a mesh.
    await _retry("lease manager", leases.start, leases.stop)
    agent.supervisor.on_shutdown("leases-stop", leases.stop)
    await _retry("controller watch", lambda: ctl.start(js), ctl.stop_watch)
    agent.status_extensions.append(ctl.status)  # "instances" in a heartbeat: controller up
    agent.supervisor.on_shutdown("controller", ctl.shutdown)
    agent.cycle_hooks.append(ctl.cycle_hook)
    return ctl


async def _retry(
    what: str, start: Callable[[], Awaitable[None]], undo: Callable[[], Awaitable[None]]
) -> None:
    backoff = 0.5
    while True:
        try:
            await start()
            return
        except (TimeoutError, NatsError, JsError, OSError) as exc:
            log.warning(f"{what} could not start; retrying", error=repr(exc), backoff=backoff)
            with contextlib.suppress(Exception):
                await undo()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
