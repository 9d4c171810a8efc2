"""One application on one agent: snapshot, decide, act, strictly one step at a time.

Each ``AppRunner`` is a small actor: its own task wakes up on a tick (every ``interval``)
or when something relevant changed (the Application, its lease, a peer's heartbeat), takes
a snapshot, calls the pure ``decide`` and carries the decision out before it looks again.
Different applications never wait for each other; one application's steps never overlap,
so a planned failover (stop, then hand over) cannot interleave with a start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from agent.application import Application, Strategy, Trait
from agent.controller.decide import decide
from agent.controller.model import (
    Decision,
    InstanceState,
    LeaseView,
    Policy,
    Run,
    Snapshot,
    WorkloadView,
)
from agent.controller.statefile import Recorded, proc_start_time
from mesh.names import app_key, slot_key
from scores.base import Interpret, Observation, RunContext, WorkloadState
from scores.check import CapabilityError, interpret_for

if TYPE_CHECKING:
    from agent.controller.controller import Controller

log = structlog.get_logger("agent.controller")

_CRASH_REASONS = frozenset({"crashed", "spawn-failed"})


@dataclass(frozen=True)
class InstanceReport:
    """What this agent says about one application in its heartbeat and live status."""

    app: str
    state: InstanceState
    token: int | None
    detail: str
    lease_token: int | None
    partitioned: bool
    pid: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "state": self.state.value,
            "token": self.token,
            "detail": self.detail,
            "lease_token": self.lease_token,
            "partitioned": self.partitioned,
            "pid": self.pid,
        }


class AppRunner:
    def __init__(self, name: str, ctl: Controller) -> None:
        self.name = name
        self.ctl = ctl
        self.interpret: Interpret | None = None
        self.score: object | None = None
        self.key: str | None = None
        self.wanting = False
        self.run_token: int | None = None
        self.consistent = True
        self.failures = 0
        self.crash_base = 0
        self.healthy_since: float | None = None
        self.cooldown_until = float("-inf")
        self.backoff_until = float("-inf")
        self.backoff = 0.5
        self.state = InstanceState.STANDBY
        self.detail = "not decided yet"
        self.partitioned = False
        self.pid: int | None = None
        self.last_sentence = ""
        self.reported_token: int | None = None
        self.last_event: tuple[str, int | None] | None = None
        self.decisions = 0
        self.wake = asyncio.Event()
        self.lock = asyncio.Lock()
        self.done = False

    # --- the actor --------------------------------------------------------------------------

    async def run(self) -> None:
        while not self.done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.ctl.interval)
            self.wake.clear()
            async with self.lock:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("controller step failed", app=self.name, error=repr(exc))

    # --- one cycle --------------------------------------------------------------------------

    def _key_for(self, app: Application | None) -> str | None:
        if app is None:
            return None
        if app.spec.trait is Trait.STATEFUL:
            return app_key(self.name)
        return slot_key(self.name, self.ctl.site)

    def _rank(self, app: Application) -> int:
        sites = app.spec.placement.sites
        if app.spec.trait is Trait.STATELESS or self.ctl.site not in sites:
            return 0
        return sites.index(self.ctl.site)

    async def step(self) -> Decision:
        ctl = self.ctl
        app = ctl.desired.get(self.name)
        eligible = app is not None and ctl.site in app.spec.placement.sites
        key = self._key_for(app) if eligible else None

        if self.key is not None and key is not None and key != self.key:
            # The trait changed: the old lease and instance belong to another key.
            await self._let_go(f"{self.name}: trait changed; stopping and releasing {self.key}")
        if app is not None and self.interpret is not None and app.spec.score != self.score:
            log.info(f"{self.name}: score changed; restarting the workload", app=self.name)
            await self._stop_workload()
            await self.interpret.close()
            self.interpret = None
        if app is not None and eligible and self.interpret is None:
            try:
                self.interpret = interpret_for(app.spec.score, ctl.topology, app=self.name)
                self.score = app.spec.score
            except CapabilityError as exc:
                self._report(InstanceState.FAILED, str(exc))
                return Decision(want=False, run=Run.KEEP, state=InstanceState.FAILED)
        if app is not None:
            self.consistent = app.spec.failover.strategy is Strategy.ABSOLUTE_CONSISTENCY
            if key is not None:
                self.key = key

        now = ctl.clock()
        obs = await self.interpret.observe() if self.interpret is not None else None
        self._count_failures(obs, now)
        held = ctl.leases.held()
        token = held.get(self.name)
        status = ctl.leases.observe().get(self.name)
        lease = LeaseView(
            held=token is not None,
            token=token,
            deadline=ctl.leases.deadline() if token is not None else float("-inf"),
            holder=status.holder if status is not None else None,
        )
        running = obs is not None and obs.state is WorkloadState.RUNNING
        if running and obs is not None and obs.pids and obs.pids[0] != self.pid:
            self._remember(obs)  # the interpret restarted a crashed workload: new pid
        peer_site = ctl.site if app is not None and app.spec.trait is Trait.STATELESS else None
        snap = Snapshot(
            now=now,
            agent=ctl.agent_id,
            site=ctl.site,
            present=app is not None,
            eligible=eligible,
            consistent=self.consistent,
            policy=Policy(app.spec.failover.reconcile.value) if app else Policy.KEEP_NEWEST,
            lease=lease,
            workload=WorkloadView(
                running=running,
                token=self.run_token if running else None,
                failed=obs is not None and obs.state is WorkloadState.FAILED,
                reason=obs.reason if obs else None,
                detail=obs.detail if obs else "",
            ),
            failures=self.failures,
            max_failures=ctl.max_failures,
            cooldown_until=self.cooldown_until,
            backoff_until=self.backoff_until,
            fenced=ctl.is_fenced(self.name),
            drained=ctl.is_drained(),
            peers=tuple(
                p for p in ctl.peers.instances(self.name, site=peer_site) if p.agent != ctl.agent_id
            ),
        )
        d = decide(self.name, snap)
        self.decisions += 1
        await self._execute(d, snap, app)
        return d

    def _count_failures(self, obs: Observation | None, now: float) -> None:
        """Consecutive crashes of the current run, reset after a healthy stretch."""
        if obs is None:
            return
        crashes = obs.restarts + (
            1 if obs.state is WorkloadState.FAILED and obs.reason in _CRASH_REASONS else 0
        )
        if obs.state is WorkloadState.RUNNING:
            if self.healthy_since is None:
                self.healthy_since = now
            elif now - self.healthy_since >= self.ctl.healthy_after:
                self.crash_base = crashes
                self.failures = 0
                return
        else:
            self.healthy_since = None
        self.failures = max(self.failures, crashes - self.crash_base)

    async def _execute(self, d: Decision, s: Snapshot, app: Application | None) -> None:
        ctl = self.ctl
        prior = self.run_token if self.pid is not None else None
        if d.give_up:
            self.cooldown_until = s.now + ctl.cooldown
            self.failures = 0
        changed = False
        if d.run is Run.START and s.lease.token is not None:
            changed = await self._start(s.lease.token, s.lease.deadline)
            if not changed:
                d = Decision(
                    want=True,
                    run=Run.KEEP,
                    state=InstanceState.FAILED,
                    event="start-failed",
                    sentence=f"{self.name}: start with token {s.lease.token} failed: {self.detail}",
                )
        elif d.release or d.handover_to is not None:
            self.wanting = False
            changed = await ctl.leases.release(self.name, to=d.handover_to, stop=self._halt)
            await self._stop_workload()  # also when the lease went away while stopping
            changed = True
        elif d.run is Run.STOP:
            changed = await self._stop_workload()
        elif (
            d.run is Run.KEEP
            and s.workload.running
            and self.interpret is not None
            and not self.consistent
        ):
            self.interpret.clear_deadline()

        if d.want and not self.wanting and self.key is not None and app is not None:
            ctl.leases.want(self.name, self.key, rank=self._rank(app))
            self.wanting = True
        elif not d.want and self.wanting:
            self.wanting = False
            await ctl.leases.release(self.name, stop=self._halt)

        self.partitioned = d.run is Run.KEEP and s.workload.running and not s.lease.valid(s.now)
        token = self.run_token if self.pid is not None else s.lease.token
        if (d.state, token) != (self.state, self.reported_token) and not self.consistent:
            ctl.announce_soon()
        self.reported_token = token
        self._report(d.state, d.sentence)
        if d.sentence != self.last_sentence:
            self.last_sentence = d.sentence
            log.info(d.sentence, app=self.name, fencing_token=token, state=d.state.value)
        if d.event is not None and (changed or d.run is Run.KEEP):
            # A stop is reported with the token of the instance it stopped.
            event_token = token if d.run is Run.START or prior is None else prior
            mark = (d.event, event_token)
            if mark != self.last_event:
                self.last_event = mark
                await ctl.events.publish(
                    d.event, self.name, event_token, state=d.state.value, sentence=d.sentence
                )
        if not s.present and not s.workload.running and not s.lease.held and not self.wanting:
            self.done = True

    # --- actions ----------------------------------------------------------------------------

    async def _start(self, token: int, deadline: float) -> bool:
        ctl, interpret = self.ctl, self.interpret
        if interpret is None:
            return False
        ctx = RunContext(
            app=self.name,
            site=ctl.site,
            node=ctl.node,
            fencing_token=token,
            state_dir=ctl.state_dir,
            deadline=deadline if self.consistent else None,
        )
        if self.consistent:
            interpret.extend_deadline(deadline)
        else:
            interpret.clear_deadline()
        self.crash_base, self.failures, self.healthy_since = 0, 0, None
        outcome = await interpret.promote(ctx)
        if not outcome.ok:
            self.failures += 1
            self.backoff_until = ctl.clock() + self.backoff
            self.backoff = min(self.backoff * 2, 30.0)
            self.detail = outcome.message
            return False
        self.backoff = 0.5
        self.run_token = token
        self._remember(await interpret.observe())
        return True

    def _remember(self, obs: Observation) -> None:
        """Record the workload's pids in the 0600 state file (restart safety)."""
        self.pid = obs.pids[0] if obs.pids else None
        guard = obs.extra.get("guard_pid")
        if self.pid is None or self.run_token is None:
            return
        stop_timeout = getattr(getattr(self.interpret, "spec", None), "stop_timeout", 5.0)
        self.ctl.statefile.record(
            Recorded(
                app=self.name,
                token=self.run_token,
                pid=self.pid,
                pid_start=proc_start_time(self.pid),
                guard_pid=guard if isinstance(guard, int) else None,
                guard_start=proc_start_time(guard) if isinstance(guard, int) else None,
                stop_timeout=float(stop_timeout),
            )
        )

    async def _halt(self) -> None:
        await self._stop_workload()

    async def _stop_workload(self) -> bool:
        """Stop (demote) the local workload; True if something was running."""
        interpret = self.interpret
        was = self.pid is not None
        if interpret is not None:
            obs = await interpret.observe()
            if obs.state is WorkloadState.RUNNING:
                was = True
            outcome = await interpret.demote()
            was = was or outcome.changed
        if self.pid is not None:
            self.ctl.statefile.forget(self.name)
        self.pid = None
        self.run_token = None
        return was

    async def _let_go(self, sentence: str) -> None:
        log.info(sentence, app=self.name)
        self.wanting = False
        await self.ctl.leases.release(self.name, stop=self._halt)
        await self._stop_workload()
        self.key = None

    async def shutdown(self) -> None:
        """Agent stopping: stop the workload while the lease is still ours, then release."""
        async with self.lock:
            self.done = True
            if self.wanting or self.name in self.ctl.leases.held():
                await self.ctl.leases.release(self.name, stop=self._halt)
            await self._stop_workload()
            self.wanting = False
            if self.interpret is not None:
                await self.interpret.close()
            self._report(InstanceState.STOPPED, f"{self.name}: agent shutting down")

    async def planned_failover(self, to: str) -> tuple[bool, str]:
        """Stop here first, then hand the lease to ``to`` (an agent id or a site)."""
        async with self.lock:
            token = self.ctl.leases.held().get(self.name)
            if token is None:
                return False, f"{self.ctl.agent_id} does not hold {self.name}"
            started = time.monotonic()
            self.wanting = False
            ok = await self.ctl.leases.handover(self.name, to, stop=self._halt)
            await self._stop_workload()
            took = time.monotonic() - started
            sentence = (
                f"{self.name}: planned failover; stopped token {token} on {self.ctl.agent_id} "
                f"and handed the lease to {to} in {took * 1000:.0f}ms"
            )
            log.info(sentence, app=self.name, fencing_token=token)
            self._report(InstanceState.STANDBY, sentence)
            await self.ctl.events.publish(
                "handover", self.name, token, to=to, ok=ok, sentence=sentence
            )
            return ok, sentence

    # --- reporting --------------------------------------------------------------------------

    def _report(self, state: InstanceState, detail: str) -> None:
        self.state = state
        self.detail = detail

    def report(self) -> InstanceReport:
        held = self.ctl.leases.held().get(self.name)
        partitioned = self.partitioned and self.state is InstanceState.RUNNING
        detail = self.detail
        if partitioned and "partitioned" not in detail:
            detail = f"partitioned, serving: {detail}"
        return InstanceReport(
            app=self.name,
            state=self.state,
            token=self.run_token if self.pid is not None else held,
            detail=detail,
            lease_token=held,
            partitioned=partitioned,
            pid=self.pid,
        )
