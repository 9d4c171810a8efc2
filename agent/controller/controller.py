"""The application controller: desired state in, leases and workloads out.

It routes inputs to one ``AppRunner`` per application: one KV watch on ``harmony-state``
feeds the desired Applications (``app.<name>``), the operator marks (``drain.<site>``,
``fence.<app>``) and the peers' instance reports (``inst.<app>.<site>.<node>``); gossip on
``harmony.instances.>`` reaches across a healed partition at once; lease callbacks and
workload exits wake the runner concerned. Nothing here decides: rules live in
``decide.py``, actions in ``runner.py``. The controller is the runners' ``Ports``.

Boot order matters: marks and Applications are loaded (the watch's first snapshot) before
any runner exists, so a fenced application is never started for a moment at boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client
from nats.js.kv import KeyValue

from agent.application import Application, Strategy, Trait
from agent.commands.models import Reply
from agent.controller.events import EventPublisher
from agent.controller.model import PeerInstance, Replica
from agent.controller.peers import PeerTable
from agent.controller.ports import InstanceReport, LeasePort
from agent.controller.roles import switchover_target
from agent.controller.runner import AppRunner
from agent.controller.statefile import StateFile
from agent.timing import Timing
from mesh import codec
from mesh.clock import boottime
from mesh.names import (
    APP_PREFIX,
    DRAIN_PREFIX,
    FENCE_PREFIX,
    INSTANCE_PREFIX,
    INSTANCES_SUBJECTS,
    STATE_BUCKET,
    instance_key,
    instances_subject,
)
from mesh.watch import Change, KvWatch
from topologies.base import Topology

log = structlog.get_logger("agent.controller")


class ControllerFailed(RuntimeError):
    """A runner task died of a bug: the agent must restart clean (exit 1)."""


class Controller:
    def __init__(
        self,
        *,
        nc: Client,
        state: KeyValue,
        site: str,
        node: str,
        state_dir: Path,
        timing: Timing,
        max_failures: int,
        leases: LeasePort,
        alive: Callable[[str], bool],
        agents: Callable[[], list[str]],
        holder: Callable[[str], str | None],
        events: EventPublisher,
        topology: Topology,
        statefile: StateFile,
    ) -> None:
        self.nc = nc
        self.kv = state
        self.site = site
        self.node = node
        self.agent_id = f"{site}/{node}"
        self.state_dir = state_dir
        self.timing = timing
        self.max_failures = max_failures
        self.leases = leases
        self._holder = holder
        self._agents = agents
        self.events = events
        self.topology = topology
        self.statefile = statefile
        self.peer_table = PeerTable(self.agent_id, timing.ttl, boottime, alive)
        self._heard: set[str] = set()
        self.desired: dict[str, Application] = {}
        self.invalid: dict[str, str] = {}
        self.drained_sites: set[str] = set()
        self.fenced_apps: set[str] = set()
        self.runners: dict[str, AppRunner] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping = False
        self.failure: BaseException | None = None
        self._watch: KvWatch | None = None
        self._gossip_sub: Any = None
        self._pending_reports: dict[str, InstanceReport] = {}
        self._reports_dirty = asyncio.Event()
        self._gossip_due = asyncio.Event()
        self._failed = asyncio.Event()
        self.on_held_changed: list[Any] = []
        self._held_seen: frozenset[str] = frozenset()
        self._held_check_due = False
        self._polls: dict[str, int] = {}
        """Replicated applications whose new holder asks the replicas how far they reached:
        app -> lease term (sent with the next gossip only)."""

    # --- Ports for the runners -----------------------------------------------------------------

    def clock(self) -> float:
        return boottime()

    def app(self, name: str) -> Application | None:
        return self.desired.get(name)

    def fenced(self, name: str) -> bool:
        return name in self.fenced_apps

    def drained(self) -> bool:
        return self.site in self.drained_sites

    def peers(self, name: str, site: str | None) -> tuple[PeerInstance, ...]:
        return self.peer_table.instances(name, site=site)

    def holder(self, name: str) -> str | None:
        result: str | None = self._holder(name)
        return result

    def replicas(self, name: str, sites: list[str]) -> tuple[Replica, ...]:
        return self.peer_table.replicas(name, sites)

    async def poll(self, name: str, term: int) -> None:
        """Ask every agent how far its replica of ``name`` reached (for lease ``term``): a
        gossip message; each answers by gossiping a report observed after receiving it."""
        self._polls[name] = term
        await self.gossip()

    async def publish(self, event: str, app: str, token: int | None, **fields: Any) -> None:
        await self.events.publish(event, app, token, **fields)

    def report(self, report: InstanceReport, *, urgent: bool = False) -> None:
        self._pending_reports[report.app] = report
        self._reports_dirty.set()
        app = self.desired.get(report.app)
        if app is not None and (not self._consistent(app) or urgent):
            self._gossip_due.set()

    def remember(self, app: str, token: int, pid: int | None, stop_timeout: float) -> None:
        self.statefile.record(app, token, pid, stop_timeout)

    def forget(self, app: str) -> None:
        self.statefile.forget(app)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Load Applications and marks (the watch's first snapshot), then create runners."""
        self._gossip_sub = await self.nc.subscribe(INSTANCES_SUBJECTS, cb=self._on_gossip)
        self._watch = KvWatch(self.nc, STATE_BUCKET, ">", self._on_state, heartbeat=1.0)
        await self._watch.start()
        await asyncio.wait_for(self._watch.ready.wait(), timeout)
        for name in sorted(self.desired):
            self._ensure_runner(name)
        log.info(
            "controller_started",
            msg=f"controller started with {len(self.desired)} applications",
            apps=len(self.desired),
        )

    async def run(self) -> None:
        """The controller's own task: flush reports and gossip, and fail loudly if any
        runner died of a bug (the supervisor then restarts the agent clean)."""
        flusher = asyncio.create_task(self._flush_reports(), name="instance-reports")
        gossip = asyncio.create_task(self._gossip_loop(), name="instance-gossip")
        try:
            await self._failed.wait()
            raise ControllerFailed(f"runner died: {self.failure!r}")
        finally:
            for task in (flusher, gossip):
                task.cancel()
            await asyncio.gather(flusher, gossip, return_exceptions=True)

    async def shutdown(self) -> bool:
        """SIGTERM: stop every workload and release every lease while the mesh is up.

        True when every workload is known to be stopped; False when one could not be
        stopped in its stop_timeout (its lease is then kept, not released over it)."""
        self.stopping = True
        runners = list(self.runners.values())
        results = await asyncio.gather(*(r.shutdown() for r in runners), return_exceptions=True)
        clean = True
        for runner, result in zip(runners, results, strict=True):
            if isinstance(result, BaseException):
                clean = False
                log.error(
                    "app_not_stopped_at_shutdown",
                    msg=f"{runner.name}: workload not stopped at shutdown: {result}",
                    app=runner.name,
                    error=str(result),
                )
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self._write_reports()
        if self._watch is not None:
            await self._watch.stop()
        if self._gossip_sub is not None:
            with contextlib.suppress(Exception):
                await self._gossip_sub.unsubscribe()
        log.info(
            "controller_stopped",
            msg="controller stopped" + ("" if clean else "; a workload may still run"),
            clean=clean,
        )
        return clean

    # --- inputs ----------------------------------------------------------------------------

    def _on_state(self, change: Change) -> None:
        key = change.key
        if key.startswith(APP_PREFIX):
            self._on_app(key[len(APP_PREFIX) :], change.value, change.revision)
        elif key.startswith(INSTANCE_PREFIX):
            parts = key.split(".")
            if len(parts) == 4 and self.peer_table.feed_report(
                parts[1], f"{parts[2]}/{parts[3]}", change.value
            ):
                self._wake(parts[1])
        elif key.startswith(DRAIN_PREFIX):
            site = key[len(DRAIN_PREFIX) :]
            marks = self.drained_sites
            (marks.add if change.value is not None else marks.discard)(site)
            if site == self.site:
                self.tick()
        elif key.startswith(FENCE_PREFIX):
            app = key[len(FENCE_PREFIX) :]
            (self.fenced_apps.add if change.value is not None else self.fenced_apps.discard)(app)
            self._wake(app)

    async def _on_gossip(self, msg: Any) -> None:
        fresh = self.peer_table.knows
        agent = None
        with contextlib.suppress(Exception):
            agent = json.loads(msg.data).get("agent")
        back = isinstance(agent, str) and not fresh(agent)
        _, apps = self.peer_table.feed_gossip(bytes(msg.data))
        for app in apps:
            self._wake(app)
        if isinstance(agent, str) and agent != self.agent_id:
            self._answer_polls(agent, msg.data)
        if back and agent != self.agent_id:
            # A peer we had not heard from (new, or back from a partition): answer with our
            # own instances at once, so both sides of a healed partition learn of each other
            # in one round trip.
            self._gossip_due.set()

    def _answer_polls(self, agent: str, data: bytes) -> None:
        """A new holder's poll: each replica we run answers with a fresh observation (and
        its runner points it to the holder, which is about to be promoted)."""
        polls = None
        with contextlib.suppress(ValueError, AttributeError):
            polls = json.loads(data).get("polls")
        for poll in polls if isinstance(polls, list) else []:
            app = poll.get("app") if isinstance(poll, dict) else None
            term = poll.get("term") if isinstance(poll, dict) else None
            runner = self.runners.get(app) if isinstance(app, str) else None
            if runner is None or not runner.replicated or not isinstance(term, int):
                continue
            assert isinstance(app, str)
            self.peer_table.feed_poll(app, agent, term)
            task = asyncio.get_running_loop().create_task(runner.answer(term))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
            runner.wake.set()

    def _on_app(self, name: str, value: bytes | None, revision: int) -> None:
        if "." in name:
            return
        if value is None:
            self.desired.pop(name, None)
            self.invalid.pop(name, None)
            log.info("app_deleted", msg=f"{name}: application deleted", app=name)
        else:
            data = codec.load_object(
                value, kind="application", key=f"app.{name}", revision=revision
            )
            try:
                if data is None:
                    raise ValueError("not a JSON object")
                app = Application.model_validate(data)
                if app.name != name:
                    raise ValueError(f"metadata.name {app.name!r} does not match key app.{name}")
            except ValueError as exc:
                # Keep the last good spec: a bad write must not stop a running application.
                self.invalid[name] = str(exc).splitlines()[0]
                log.error(
                    "app_invalid",
                    msg=f"{name}: invalid application ignored: {self.invalid[name]}",
                    app=name,
                    error=self.invalid[name],
                )
                return
            self.invalid.pop(name, None)
            if self.desired.get(name) != app:
                log.info("app_changed", msg=f"{name}: application changed", app=name)
            self.desired[name] = app
        if self._watch is not None and self._watch.ready.is_set():
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
        task = asyncio.create_task(runner.run(), name=f"app:{name}")
        task.add_done_callback(lambda t, n=name: self._runner_ended(n, t))  # type: ignore[misc]
        self.tasks[name] = task

    def _runner_ended(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self.stopping:
            log.error(
                "app_runner_died",
                msg=f"{name}: application runner died: {exc!r}",
                app=name,
                error=repr(exc),
            )
            self.failure = exc
            self._failed.set()
            return
        if self.runners.get(name) is not None and self.runners[name].done:
            del self.runners[name]
            self.tasks.pop(name, None)
            if name in self.desired and not self.stopping:
                self._ensure_runner(name)

    def _wake(self, app: str) -> None:
        runner = self.runners.get(app)
        if runner is not None:
            runner.wake.set()

    def tick(self) -> None:
        """Wake every runner (a drain of our site, a session change)."""
        for runner in self.runners.values():
            runner.wake.set()

    # --- lease callbacks ---------------------------------------------------------------------

    def lease_changed(self, name: str, *_: object) -> None:
        self._wake(name.split("@", 1)[0])
        self._held_changed_soon()

    def lease_observed(self, name: str) -> None:
        """A claim of ``name`` was written somewhere: the runner's idea of its holder may
        be stale (AbsoluteConsistency runners are not polled)."""
        self._wake(name.split("@", 1)[0])

    def renewed(self) -> None:
        """The session moved: refresh the deadline of every running CP workload."""
        for runner in self.runners.values():
            if runner.run_token is not None and runner.consistent:
                runner.apply_deadline()

    def _held_changed_soon(self) -> None:
        """Once per loop iteration, however many leases were gained or lost in it (a mass
        takeover gains hundreds at once: one comparison and one callback, not one each)."""
        if not self._held_check_due:
            self._held_check_due = True
            asyncio.get_running_loop().call_soon(self._held_changed)

    def _held_changed(self) -> None:
        self._held_check_due = False
        held = frozenset(self.leases.held())
        if held == self._held_seen or self.stopping:
            return
        self._held_seen = held
        for cb in self.on_held_changed:
            result = cb(held)
            if asyncio.iscoroutine(result):
                task = asyncio.get_running_loop().create_task(result)
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    # --- reports and gossip -------------------------------------------------------------------

    async def _flush_reports(self) -> None:
        while True:
            await self._reports_dirty.wait()
            self._reports_dirty.clear()
            await self._write_reports()
            await asyncio.sleep(0.05)  # coalesce bursts (a start storm)

    async def _write_reports(self) -> None:
        pending, self._pending_reports = self._pending_reports, {}
        for app, report in pending.items():
            body = json.dumps({**report.as_dict(), "time": codec_time()}).encode()
            try:
                await self.kv.put(instance_key(app, self.site, self.node), body)
            except Exception as exc:
                # The state bucket is unreachable (partition): keep the newest, retry later.
                self._pending_reports.setdefault(app, report)
                log.debug(
                    "instance_report_not_written",
                    msg=f"{app}: instance report not written: {exc!r}",
                    app=app,
                    error=repr(exc),
                )
        if self._pending_reports:
            await asyncio.sleep(1.0)
            self._reports_dirty.set()

    async def _gossip_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gossip_due.wait(), self.timing.ttl / 3)
            self._gossip_due.clear()
            await self.gossip()

    async def gossip(self) -> None:
        """Report SplitBrainAllowed and replicated instances on the core subject (see
        ``peers.py``): it crosses a healed link at once and never waits for a JetStream
        election, so replicas learn of a new primary, and a new holder of its replicas'
        positions, within one message."""
        items = [
            r.report.as_dict()
            for name, r in self.runners.items()
            # cheap first: most applications are AbsoluteConsistency and not replicated
            if (not r.consistent or r.replicated)
            and name in self.desired
            and (not self._consistent(self.desired[name]) or r.replicated)
            and self.site in self.desired[name].spec.placement.sites
        ]
        polls, self._polls = self._polls, {}
        if not items and not polls:
            return
        body: dict[str, Any] = {"agent": self.agent_id, "instances": items}
        if polls:
            body["polls"] = [{"app": app, "term": term} for app, term in sorted(polls.items())]
        with contextlib.suppress(Exception):
            await self.nc.publish(
                instances_subject(self.site, self.node), json.dumps(body).encode()
            )

    @staticmethod
    def _consistent(app: Application) -> bool:
        return app.spec.failover.strategy is Strategy.ABSOLUTE_CONSISTENCY

    # --- planned failover (command plane) ----------------------------------------------------

    async def failover(self, app: str, to_site: str | None) -> Reply:
        runner = self.runners.get(app)
        spec = self.desired.get(app)
        if runner is None or spec is None:
            return Reply.failure(f"unknown application {app!r}")
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
        if runner.replicated:
            found, problem = switchover_target(
                runner.local_replica(),
                self.peer_table.replicas(app, sites),
                candidates,
                spec.spec.failover.max_lag,
            )
            if found is None:
                return Reply.failure(f"{app}: {problem}")
            target: str | None = found
        else:
            target = next((s for s in candidates if self.live_agents(s)), None)
        if target is None:
            return Reply.failure(f"no live agent on {', '.join(candidates) or 'any other site'}")
        ok, sentence = await runner.planned_failover(target)
        if not ok:
            return Reply.failure(sentence)
        runner.wake.set()
        return Reply.success(from_agent=self.agent_id, to=target, message=sentence)

    def live_agents(self, site: str) -> list[str]:
        return [a for a in self._agents() if a.split("/", 1)[0] == site]

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        instances = [
            r.report.as_dict()
            for name, r in sorted(self.runners.items())
            if name in self.desired and self.site in self.desired[name].spec.placement.sites
        ]
        return {"instances": instances, "invalid": dict(self.invalid)}


def codec_time() -> str:
    from mesh.clock import now_rfc3339

    return now_rfc3339()
