"""One application on one agent: snapshot, decide, carry the plan out, one step at a time.

Each ``AppRunner`` is a small actor: its task wakes when something relevant changed (the
Application, its lease, its workload, a peer's report, a mark) or when the plan asked to be
woken (``retry_at``), takes a snapshot through its ports, calls the pure ``decide`` and
carries the plan out before it looks again. Different applications never wait for each
other; one application's steps never overlap, so a planned failover (stop, then hand over)
cannot interleave with a start.

Every call into an Interpret is bounded: by the topology command timeout, and while we hold
an AbsoluteConsistency lease, by its deadline too (a hung SSH or API call must not keep a
workload's runner past the instant it must have stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable
from typing import TypeVar

import structlog

from agent import app_metrics
from agent.application import Application, Strategy, Trait
from agent.controller.decide import decide
from agent.controller.model import (
    CRASH_REASONS,
    FIRST_BACKOFF,
    ROLE_ACTIONS,
    InstanceState,
    LeaseView,
    Plan,
    Policy,
    Release,
    Run,
    Snapshot,
    WorkloadView,
)
from agent.controller.ports import (
    URGENT_REPLICATION,
    InstanceReport,
    LeasePort,
    Ports,
    StillRunning,
)
from agent.controller.replicated import ReplicaRoles
from mesh.clock import wall_iso
from scores.base import (
    Deadline,
    Interpret,
    Observation,
    Outcome,
    ReplicatedInterpret,
    ReplicationStatus,
    RunContext,
    WorkloadState,
)
from scores.check import CapabilityError, interpret_for
from scores.health import health_rules
from scores.probes import HealthMonitor, health_monitor

log = structlog.get_logger("agent.controller")
__all__ = ["AppRunner", "InstanceReport", "LeasePort", "Ports", "StillRunning"]
T = TypeVar("T")
STEP_LOG_EVERY = 60.0
"""A cycle that keeps failing is logged with its traceback at most this often (seconds)."""


class AppRunner(ReplicaRoles):
    def __init__(self, name: str, ports: Ports) -> None:
        self.name = name
        self.p = ports
        self.interpret: Interpret | None = None
        self.score: object | None = None
        self.health: HealthMonitor | None = None
        self.lease_name: str | None = None
        self.consistent = True
        self.run_token: int | None = None
        self.pid: int | None = None
        """The running workload's main pid, as last observed (for status)."""
        self._told: Interpret | None = None
        """The Interpret last told to follow the session (its fence needs no updates)."""
        self.failures = 0
        """Consecutive failures here (failed starts, crashes); ``max_failures`` gives up."""
        self.failed_before = 0
        """``failures`` when the current run started: its crashes add to them."""
        self.crash_base = 0
        self.healthy_since: float | None = None
        self.cooldown_until = float("-inf")
        self.backoff_until = float("-inf")
        self.backoff = FIRST_BACKOFF
        self.start_failed: str | None = None
        self.report = InstanceReport(
            name, InstanceState.STANDBY, None, "not decided yet", None, False, None
        )
        self.last_sentence = ""
        self.last_event: tuple[str, int | None] | None = None
        self.retry_at: float | None = None
        self.decisions = 0
        self.step_failures = 0
        """Cycles in a row that raised (a bug, or a fault nothing handles)."""
        self.step_logged_at = float("-inf")
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()
        self.done = False
        # replicated Scores (roles.py)
        self.replicated = False
        self.local: ReplicationStatus | None = None
        self.following: tuple[str, int] | None = None
        self.pointed: str | None = None
        self.held: tuple[int, float] | None = None
        self.answered: int | None = None
        self.answering = False
        self.sync_applied: tuple[str, ...] | None = None
        self.reported_at = float("-inf")
        self.written = self.report
        """The last report handed to the mesh (the one a position change is compared with)."""

    # --- the actor --------------------------------------------------------------------------

    async def run(self) -> None:
        while not self.done:
            timeout = self._backstop()
            if self.retry_at is not None:
                timeout = min(timeout, max(0.0, self.retry_at - self.p.clock()))
            # A timer that sets the event, not wait_for: wait_for costs a task per wait,
            # and a thousand runners wait all the time.
            timer = asyncio.get_running_loop().call_later(timeout, self.wake.set)
            try:
                await self.wake.wait()
            finally:
                timer.cancel()
            self.wake.clear()
            async with self.lock:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._step_failed(exc)
                else:
                    if self.step_failures:
                        log.info(
                            "app_step_recovered",
                            msg=f"{self.name}: controller step works again after "
                            f"{self.step_failures} failed",
                            app=self.name,
                        )
                        self.step_failures = 0

    def _step_failed(self, exc: Exception) -> None:
        """A cycle raised. The runner carries on (the next cycle may work, and a held
        workload's deadline is the fence's, not this loop's), but must not fail silently:
        the instance's status carries the error until a cycle works again, a counter
        moves, the traceback is logged the first time and then once a minute, not every
        cycle, and the next try comes after a control interval, not the idle backstop."""
        self.step_failures += 1
        app_metrics.step_failed(self.name)
        error = f"controller step failed: {exc!r}"
        now = self.p.clock()
        self.retry_at = now + self.p.timing.control_interval
        loud = self.step_failures == 1 or now - self.step_logged_at >= STEP_LOG_EVERY
        if loud:
            self.step_logged_at = now
        (log.exception if loud else log.debug)(
            "app_step_failed",
            msg=f"{self.name}: {error} ({self.step_failures} in a row)",
            app=self.name,
            error=repr(exc),
            failures=self.step_failures,
        )
        self._set_report(
            dataclasses.replace(self.report, detail=f"{self.name}: {error}", error=error)
        )

    def _backstop(self) -> float:
        """How long to sleep when nothing wakes us. Every input of an AbsoluteConsistency
        decision wakes the runner (the lease's callbacks, the Application and marks, the
        workload's own events when its Interpret reports changes, health verdicts), so
        then the cycle is only a safety net. A polled Interpret, or SplitBrainAllowed (a
        peer's liveness has no event), keeps the control interval."""
        timing = self.p.timing
        interpret = self.interpret
        if self.consistent and interpret is not None and interpret.reports_changes:
            return timing.idle_backstop
        return timing.control_interval

    # --- one cycle ---------------------------------------------------------------------------

    def _lease_name(self, app: Application) -> str:
        if app.spec.trait is Trait.STATEFUL:
            return self.name
        return f"{self.name}@{self.p.site}"

    def _rank(self, app: Application) -> int:
        sites = app.spec.placement.sites
        if app.spec.trait is Trait.STATELESS or self.p.site not in sites:
            return 0
        return sites.index(self.p.site)

    async def _prepare(self, app: Application | None, eligible: bool) -> None:
        """Follow the spec: a changed trait or Score restarts from scratch."""
        lease_name = self._lease_name(app) if app is not None and eligible else None
        if self.lease_name is not None and lease_name is not None and lease_name != self.lease_name:
            log.info(
                "app_trait_changed",
                msg=f"{self.name}: trait changed; stopping and releasing",
                app=self.name,
            )
            await self._release(None)
            await self._stop_workload()
            self.lease_name = None
        if app is not None and self.interpret is not None and app.spec.score != self.score:
            log.info(
                "app_score_changed",
                msg=f"{self.name}: score changed; restarting the workload",
                app=self.name,
            )
            await self._stop_workload()
            await self.interpret.close()
            self.interpret = None
            await self._drop_health()
        if app is not None and eligible and self.interpret is None:
            try:
                self.interpret = interpret_for(app.spec.score, self.p.topology, app=self.name)
            except CapabilityError as exc:
                self.start_failed = str(exc)
                return
            self.interpret.watch(self.wake.set)
            self.score = app.spec.score
            self.replicated = isinstance(self.interpret, ReplicatedInterpret)
            if isinstance(self.interpret, ReplicatedInterpret):
                self.interpret.attach(self._ctx(0, None))
                self.local, self.following, self.sync_applied = None, None, None
        stale = self.health is None or (app is not None and self.health.spec != app.spec.health)
        if app is not None and self.interpret is not None and stale:
            await self._drop_health()
            problem = self._build_health(app)
            if problem is not None:  # refused like a missing capability: nothing runs
                self.start_failed = problem
                await self._stop_workload()
                await self.interpret.close()
                self.interpret = None
        if app is not None:
            self.consistent = app.spec.failover.strategy is Strategy.ABSOLUTE_CONSISTENCY
            if lease_name is not None:
                self.lease_name = lease_name

    def _build_health(self, app: Application) -> str | None:
        """The application's health monitor; why not, when its rules or probe are refused."""
        consistent = app.spec.failover.strategy is Strategy.ABSOLUTE_CONSISTENCY
        kind = app.spec.score.kind if consistent else None
        broken = health_rules(
            app.spec.health, self.p.timing.ttl, margin=self.p.timing.margin, score_kind=kind
        )
        if broken:
            return f"{self.name}: {broken[0]}"
        try:
            monitor = health_monitor(
                self.name, app.spec.health, app.spec.score, self.p.topology, self.interpret
            )
        except ValueError as exc:  # a probe this topology cannot run
            return f"{self.name}: spec.health.probe: {exc}"
        monitor.watch(self.wake.set)
        self.health = monitor
        return None

    async def _drop_health(self) -> None:
        if self.health is not None:
            await self.health.close()
            self.health = None

    def snapshot(self, app: Application | None, obs: Observation | None) -> Snapshot:
        p = self.p
        now = p.clock()
        eligible = app is not None and p.site in app.spec.placement.sites
        name = self.lease_name
        token = p.leases.held().get(name) if name is not None else None
        lease = LeaseView(
            held=token is not None,
            token=token,
            deadline=p.leases.deadline(name) if token is not None and name else float("-inf"),
            holder=p.holder(name) if name is not None else None,
        )
        running = obs is not None and obs.state is WorkloadState.RUNNING
        stateless = app is not None and app.spec.trait is Trait.STATELESS
        unhealthy = self._unhealthy(obs)  # first: a recovery ends the cooldown
        return Snapshot(
            now=now,
            agent=p.agent_id,
            site=p.site,
            present=app is not None,
            eligible=eligible,
            consistent=self.consistent,
            policy=Policy(app.spec.failover.reconcile.value) if app else Policy.KEEP_NEWEST,
            lease=lease,
            wanted=name is not None and p.leases.wanted(name),
            workload=WorkloadView(
                running=running,
                token=self.run_token if running else None,
                failed=obs is not None and obs.state is WorkloadState.FAILED,
                reason=obs.reason if obs else None,
                detail=obs.detail if obs else "",
                start_failed=self.start_failed,
            ),
            failures=self.failures,
            max_failures=p.max_failures,
            cooldown_until=self.cooldown_until,
            backoff_until=self.backoff_until,
            fenced=p.fenced(self.name),
            drained=p.drained(),
            peers=tuple(
                peer
                for peer in p.peers(self.name, p.site if stateless else None)
                if peer.agent != p.agent_id
            ),
            unhealthy=unhealthy,
            roles=self._roles(app, lease, now) if self.replicated and app is not None else None,
        )

    def _unhealthy(self, obs: Observation | None) -> str | None:
        """Feed the monitor this observation; why the threshold is crossed, or None."""
        if self.health is None:
            return None
        self.health.note(obs)
        if self.health.take_recovery():
            self.cooldown_until = float("-inf")  # the probe passes again: contend again
        verdict = self.health.verdict()
        return verdict.why if verdict.crossed else None

    async def step(self) -> Plan | None:
        p = self.p
        if p.stopping or self.done:
            return None  # the agent is shutting down: shutdown() owns this application now
        started = p.clock()
        app = p.app(self.name)
        eligible = app is not None and p.site in app.spec.placement.sites
        await self._prepare(app, eligible)
        obs = await self._observe()
        self._count_failures(obs, p.clock())
        if self.replicated:
            self.local = await self._replication(obs)
        snap = self.snapshot(app, obs)
        plan = decide(self.name, snap)
        self.decisions += 1
        await self._execute(plan, snap, app)
        took = p.clock() - started
        if took > 0.5:
            log.debug("slow step", app=self.name, run=plan.run.value, took=round(took, 3))
        return plan

    async def _observe(self) -> Observation | None:
        if self.interpret is None:
            return None
        obs = await self._bounded(self.interpret.observe(), "observe")
        if isinstance(obs, Outcome):
            return Observation(WorkloadState.FAILED, obs.message, reason="unreachable")
        running = obs.state is WorkloadState.RUNNING and obs.pids
        if running and self.run_token is not None:
            self.pid = obs.pids[0]
            # (A replicated Score's instances outlive the agent on purpose: it adopts them,
            # and its own watchdog enforces the deadline.)
            if not self.replicated:
                self.p.remember(self.name, self.run_token, obs.pids[0], self._stop_timeout())
        elif obs.state is not WorkloadState.RUNNING:
            self.pid = None
        return obs

    def _count_failures(self, obs: Observation | None, now: float) -> None:
        """Consecutive crashes of the current run, reset after a healthy stretch."""
        app_metrics.observed(self.name, obs)
        if obs is None:
            return
        crashes = obs.restarts + (
            1 if obs.state is WorkloadState.FAILED and obs.reason in CRASH_REASONS else 0
        )
        if obs.state is WorkloadState.RUNNING:
            if self.healthy_since is None:
                self.healthy_since = now
            elif now - self.healthy_since >= self.p.timing.healthy_after:
                self.crash_base = crashes
                self.failures = self.failed_before = 0
                return
        else:
            self.healthy_since = None
        self.failures = max(self.failures, self.failed_before + crashes - self.crash_base)

    # --- carrying a plan out ----------------------------------------------------------------

    async def _execute(self, plan: Plan, s: Snapshot, app: Application | None) -> None:
        p = self.p
        changed = False
        if plan.give_up:
            app_metrics.gave_up(self.name)
            cooldown = p.timing.cooldown
            if self.health is not None:
                cooldown = self.health.give_up(cooldown)
            self.cooldown_until = s.now + cooldown
            self.failures = self.failed_before = 0
            self.backoff, self.backoff_until = FIRST_BACKOFF, float("-inf")
        if s.roles is not None and (
            plan.run in ROLE_ACTIONS
            or plan.run is Run.POLL
            or (plan.run is Run.KEEP and (plan.release is not Release.NONE or plan.sync_standbys))
        ):
            changed = await self._carry_roles(plan, s)
            if plan.run in ROLE_ACTIONS and self.start_failed is not None:  # it failed
                plan = dataclasses.replace(plan, state=InstanceState.FAILED)
        elif plan.run is Run.START and s.lease.token is not None:
            changed = await self._start(s.lease.token, plan.deadline)
        elif plan.release is not Release.NONE:
            await self._release(plan.handover_to)
            changed = await self._stop_workload() or True
        elif plan.run is Run.STOP and (s.workload.running or s.workload.failed):
            changed = await self._stop_workload()
        self._contend(plan, app)
        self.retry_at = plan.retry_at
        self._publish_report(plan, s)
        if plan.sentence != self.last_sentence:
            self.last_sentence = plan.sentence
            log.info(
                f"app_{plan.event.value.replace('-', '_')}" if plan.event else "app_status",
                msg=plan.sentence,
                app=self.name,
                fencing_token=plan.event_token if plan.event_token is not None else s.lease.token,
                state=plan.state.value,
                deadline=wall_iso(s.lease.deadline) if s.lease.held else None,
            )
        if plan.event is not None and (changed or plan.run is Run.KEEP):
            mark = (plan.event.value, plan.event_token)
            if mark != self.last_event:
                self.last_event = mark
                await p.publish(
                    plan.event.value,
                    self.name,
                    plan.event_token,
                    state=plan.state.value,
                    sentence=plan.sentence,
                )
        self.done = plan.done and not s.workload.running

    def _contend(self, plan: Plan, app: Application | None) -> None:
        name = self.lease_name
        if name is None or app is None:
            return
        if plan.want and not self.p.leases.wanted(name):
            if app.spec.trait is Trait.STATEFUL:
                self.p.leases.want_lease(self.name, rank=self._rank(app))
            else:
                self.p.leases.want_slot(self.name)
        elif not plan.want and self.p.leases.wanted(name) and plan.release is Release.NONE:
            # Not held (else the plan releases it): just stop contending.
            task = asyncio.get_running_loop().create_task(self.p.leases.release(name))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _publish_report(self, plan: Plan, s: Snapshot) -> None:
        running = self.run_token is not None and s.workload.running
        report = InstanceReport(
            app=self.name,
            state=plan.state,
            token=self.run_token if running else s.lease.token,
            detail=plan.sentence,
            lease_token=s.lease.token,
            partitioned=plan.partitioned,
            pid=self.pid if self.run_token is not None else None,
            enforced=not self.consistent
            or (self.interpret is not None and self.interpret.enforces_deadline),
            replication=self._replication_report() if s.roles is not None else None,
            error=self.start_failed,
        )
        self._set_report(report)

    def _set_report(self, report: InstanceReport, *, urgent: bool = False) -> None:
        """Keep ``report`` (gossip reads it) and write it to the mesh when something a
        reader acts on changed; replication positions at most every ttl/3."""
        old = self.report
        key = (
            report.state,
            report.token,
            report.partitioned,
            report.lease_token,
            report.error,
            report.pid,
        )
        before = (old.state, old.token, old.partitioned, old.lease_token, old.error, old.pid)
        new_rep, old_rep = report.replication or {}, old.replication or {}
        changed = key != before or (report.replication is None) != (old.replication is None)
        changed = changed or any(new_rep.get(f) != old_rep.get(f) for f in URGENT_REPLICATION)
        now = self.p.clock()
        moved = new_rep != (self.written.replication or {})
        slow = moved and now - self.reported_at >= self.p.timing.ttl / 3
        self.report = report
        first = self.reported_at == float("-inf")  # overwrite what a previous run left
        if urgent or changed or slow or first:
            self.reported_at, self.written = now, report
            self.p.report(report, urgent=urgent or (changed and report.replication is not None))

    def _stop_timeout(self) -> float:
        return float(getattr(getattr(self.interpret, "spec", None), "stop_timeout", 5.0))

    async def _bounded(self, call: Awaitable[T], what: str) -> T | Outcome:
        """An Interpret call, bounded by the command timeout and, under a held
        AbsoluteConsistency lease, by its deadline (``Outcome.failed`` when it ran out).

        The lease's deadline is followed as renewals move it: bounding by its value at the
        call made every start of a storm "time out" after ttl - margin, although the lease
        stayed valid throughout (issue 17). Losing the lease ends the wait at once."""
        p = self.p
        loop = asyncio.get_running_loop()
        started = loop.time()
        ends = started + p.timing.command_timeout
        name = self.lease_name
        lease_end = float("-inf")
        if self.consistent and name is not None and name in p.leases.held():
            lease_end = p.leases.deadline(name)
            ends = min(ends, started + lease_end - p.clock())
        task = asyncio.ensure_future(call)
        while True:
            if lease_end > float("-inf") and name is not None:
                if name not in p.leases.held():
                    break
                moved = p.leases.deadline(name) - lease_end
                if moved > 0:  # renewed meanwhile: the bound moves with it
                    lease_end += moved
                    ends = min(started + p.timing.command_timeout, ends + moved)
            timeout = ends - loop.time()
            if timeout <= 0:
                break
            done, _ = await asyncio.wait({task}, timeout=max(0.05, timeout))
            if done:
                return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return Outcome.failed(f"{what} did not finish within {loop.time() - started:.1f}s")

    def deadline(self) -> Deadline | None:
        """Until when the running workload may run (None: no deadline)."""
        name = self.lease_name
        if not self.consistent or name is None:
            return None
        leases = self.p.leases
        return Deadline(
            leases.deadline(name),
            follows_session=leases.follows_session(name),
            support=leases.support(name),
        )

    def _ctx(self, token: int, deadline: Deadline | None) -> RunContext:
        p = self.p
        return RunContext(self.name, p.site, p.node, token, p.state_dir, deadline)

    async def _start(self, token: int, bound: bool) -> bool:
        p, interpret = self.p, self.interpret
        if interpret is None:
            return False
        deadline = self.deadline() if bound else None
        ctx = self._ctx(token, deadline)
        self._told = None
        self.healthy_since = None
        before = self.failures
        outcome = await self._bounded(interpret.promote(ctx), "start")
        if not isinstance(outcome, Outcome) or not outcome.ok:
            message = outcome.message if isinstance(outcome, Outcome) else "start failed"
            self._attempt_failed(message)
            await self._stop_workload()
            return False
        # Failures are not reset by a new attempt, only by a healthy stretch or a give-up:
        # resetting them here made a start that always fails (a missing binary, a port in
        # use), or a workload that crashes after every start, retry under the lease for
        # ever instead of letting another site try. A new run counts its crashes from 0 on
        # top of the failures before it; a start that found the run still going (its
        # Interpret about to restart it) changes nothing, or that crash would count twice.
        if outcome.changed:
            self.crash_base, self.failed_before = 0, before
        self._attempt_done()
        self.run_token = token
        if deadline is not None and deadline.follows_session and interpret.follows_session_itself:
            self._told = interpret
        if self.health is not None:
            self.health.started(ctx)
        obs = await interpret.observe()
        self.pid = pid = obs.pids[0] if obs.pids else None
        p.remember(self.name, token, pid, self._stop_timeout())
        return True

    def apply_deadline(self) -> None:
        """The lease's validity moved: tell the Interpret. Called for every running
        workload on every renewal: when the Interpret already follows the session (its
        fence reads the renewals itself) and the lease still does, there is nothing to do."""
        interpret, name = self.interpret, self.lease_name
        if interpret is None or self.run_token is None:
            return
        if self._told is interpret and name is not None and self.p.leases.follows_session(name):
            return
        deadline = self.deadline()
        follows = deadline is not None and deadline.follows_session
        self._told = interpret if follows and interpret.follows_session_itself else None
        interpret.set_deadline(deadline)

    async def _stop_workload(self) -> bool:
        """Stop (demote) the local workload; True if something was running.

        Bounded by the workload's own ``stop_timeout`` (plus a margin for SIGKILL to land),
        never by a shorter command timeout: a database must get its graceful stop, and a
        lease must not be released while its workload is still winding down. Raises
        ``StillRunning`` when it did not stop in that time (nothing is released then).
        """
        interpret = self.interpret
        was = self.run_token is not None
        if interpret is not None:
            bound = self._stop_timeout() + 5.0
            try:
                outcome = await asyncio.wait_for(interpret.demote(), bound)
            except TimeoutError:
                raise StillRunning(f"{self.name}: did not stop within {bound:g}s") from None
            was = was or outcome.changed
            if not outcome.ok:
                log.warning(
                    "app_stop_failed",
                    msg=f"{self.name}: stop failed: {outcome.message}",
                    app=self.name,
                )
                raise StillRunning(f"{self.name}: stop failed: {outcome.message}")
        self.p.forget(self.name)
        if self.health is not None:
            self.health.stopped()
        self.run_token = None
        self.following = self.pointed = None
        return was

    async def _release(self, to: str | None) -> None:
        name = self.lease_name
        if name is None:
            return
        await self.p.leases.release(name, to=to, stop=self._halt)

    async def _halt(self) -> None:
        await self._stop_workload()

    async def shutdown(self) -> None:
        """Agent stopping: stop the workload while the lease is still ours, then release."""
        async with self.lock:
            self.done = True
            await self._release(None)
            await self._stop_workload()
            if self.interpret is not None:
                await self.interpret.close()
            await self._drop_health()
            self.report = InstanceReport(
                self.name,
                InstanceState.STOPPED,
                None,
                f"{self.name}: agent shutting down",
                None,
                False,
                None,
                replication=self.report.replication,
            )
            self.p.report(self.report)

    async def planned_failover(self, to: str) -> tuple[bool, str]:
        """Stop here first, then hand the lease to ``to`` (an agent id or a site)."""
        async with self.lock:
            name = self.lease_name
            token = self.p.leases.held().get(name) if name else None
            if name is None or token is None:
                return False, f"{self.p.agent_id} does not hold {self.name}"
            started = self.p.clock()
            ok = await self.p.leases.release(name, to=to, stop=self._halt)
            await self._stop_workload()
            took = self.p.clock() - started
            sentence = (
                f"{self.name}: planned failover; stopped token {token} on {self.p.agent_id} "
                f"and handed the lease to {to} in {took * 1000:.0f}ms"
            )
            log.info("app_handed_over", msg=sentence, app=self.name, fencing_token=token, to=to)
            self.report = InstanceReport(
                self.name,
                InstanceState.STANDBY,
                None,
                sentence,
                None,
                False,
                None,
                replication=self.report.replication,
            )
            self.p.report(self.report, urgent=self.replicated)
            await self.p.publish("handover", self.name, token, to=to, ok=ok, sentence=sentence)
            return ok, sentence
