"""The runner's part for replicated Scores (issue 13): the role snapshot it hands to
``decide`` and the role plans it carries out (primary, replica, promote, demote, the poll
of the replicas before a promotion).

``decide`` and ``roles.py`` choose; this only acts, as the rest of the runner does. A mixin
of ``AppRunner`` (it shares the runner's state and its bounded calls) in its own module so
that a reader of the runner sees the common path without the replication detail.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable
from typing import Any, TypeVar

from agent.application import Application
from agent.controller.model import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    LeaseView,
    Plan,
    Release,
    Replica,
    Roles,
    Run,
    Snapshot,
)
from agent.controller.ports import InstanceReport, Ports, replication_report
from scores.base import (
    REPLICATION_EXTRA,
    Deadline,
    Interpret,
    Observation,
    Outcome,
    PrimaryInfo,
    ReplicatedInterpret,
    ReplicationStatus,
    Role,
    RunContext,
    WorkloadState,
)
from scores.probes import HealthMonitor

T = TypeVar("T")


class ReplicaRoles:
    """Role state and role actions of one application's runner (see ``AppRunner``)."""

    # The runner's state this part reads and writes (set in ``AppRunner.__init__``).
    name: str
    p: Ports
    interpret: Interpret | None
    health: HealthMonitor | None
    lease_name: str | None
    run_token: int | None
    failures: int
    failed_before: int
    crash_base: int
    healthy_since: float | None
    backoff_until: float
    backoff: float
    start_failed: str | None
    report: InstanceReport
    done: bool
    replicated: bool
    local: ReplicationStatus | None
    """Our instance's replication state, as last read."""
    following: tuple[str, int] | None
    """(agent, token) of the primary our replica streams from."""
    pointed: str | None
    """The lease holder our replica was pointed at before it was writable."""
    held: tuple[int, float] | None
    """(token, since) of the lease while we hold it."""
    answered: int | None
    answering: bool
    sync_applied: tuple[str, ...] | None

    # The runner's own calls this part uses (defined in ``AppRunner``).
    def _ctx(self, token: int, deadline: Deadline | None) -> RunContext:
        raise NotImplementedError

    def deadline(self) -> Deadline | None:
        raise NotImplementedError

    async def _bounded(self, call: Awaitable[T], what: str) -> T | Outcome:
        raise NotImplementedError

    async def _halt(self) -> None:
        raise NotImplementedError

    def _set_report(self, report: InstanceReport, *, urgent: bool = False) -> None:
        raise NotImplementedError

    def _roles(self, app: Application, lease: LeaseView, now: float) -> Roles:
        """The replicated part of the snapshot: our instance, every peer's report."""
        if lease.valid(now) and lease.token is not None:
            if self.held is None or self.held[0] != lease.token:
                self.held = (lease.token, now)
        else:
            self.held = None
        local = self.local_replica()
        timing = self.p.timing
        return Roles(
            local=local,
            peers=tuple(
                r
                for r in self.p.replicas(self.name, list(app.spec.placement.sites))
                if r.agent != self.p.agent_id
            ),
            following=self.following,
            pointed=self.pointed,
            max_lag=app.spec.failover.max_lag,
            held_since=self.held[1] if self.held else float("-inf"),
            poll_wait=min(2.0, timing.ttl / 2),
        )

    def local_replica(self) -> Replica:
        st = self.local
        end = self._endpoint()
        if st is None:
            return Replica(self.p.agent_id, None, False, None, None)
        return Replica(
            agent=self.p.agent_id,
            role=str(st.role) if st.has_data else None,
            running=st.running,
            position=st.position,
            timeline=st.timeline,
            lag=st.lag_bytes,
            token=self.run_token,
            host=end.get("host"),
            port=end.get("port"),
            name=end.get("application_name"),
        )

    def _endpoint(self) -> dict[str, Any]:
        interpret = self.interpret
        if not isinstance(interpret, ReplicatedInterpret):
            return {}
        try:
            return interpret.endpoint()
        except Exception:  # an Interpret must not break the loop
            return {}

    async def _replication(self, obs: Observation | None) -> ReplicationStatus | None:
        """Our instance's replication state: from the observation when it carries it,
        else asked (a stopped instance: what its files say)."""
        interpret = self.interpret
        if not isinstance(interpret, ReplicatedInterpret):
            return None
        if obs is not None and obs.state is WorkloadState.RUNNING:
            found = obs.extra.get(REPLICATION_EXTRA)
            if isinstance(found, ReplicationStatus):
                return found
        status = await self._bounded(interpret.status(), "status")
        if isinstance(status, Outcome):
            return ReplicationStatus(
                Role.REPLICA, None, None, None, status.message, running=False, has_data=False
            )
        return status

    def _replication_report(self) -> dict[str, Any] | None:
        return replication_report(self.local, self._endpoint(), self.answered)

    async def _carry_roles(self, plan: Plan, s: Snapshot) -> bool:
        """Sync standbys, then the role action, then a release without a stop (the local
        instance is a replica or nothing: a holder that hands over keeps its replica)."""
        interpret = self.interpret
        if not isinstance(interpret, ReplicatedInterpret):
            return False
        wanted_sync = plan.sync_standbys
        if wanted_sync is not None and wanted_sync != self.sync_applied:
            done = await self._role_call(interpret.set_sync_standbys(wanted_sync), "sync")
            if done.ok:
                self.sync_applied = wanted_sync
        changed = False
        token = s.lease.token
        if plan.run in (Run.START_PRIMARY, Run.PROMOTE) and token is not None:
            changed = await self._become_primary(interpret, plan.run, token)
        elif plan.run in (Run.START_REPLICA, Run.DEMOTE):
            changed = await self._become_replica(interpret, plan)
        elif plan.run is Run.POLL and token is not None:
            await self.p.poll(self.name, token)
        if plan.release is not Release.NONE and self.lease_name is not None:
            # Only a local instance known to be a replica keeps running; anything else (a
            # primary, or a state we could not read) is stopped before the lease goes.
            local = self.local
            replica = local is not None and local.has_data and local.role is Role.REPLICA
            keep = replica and self.run_token is None
            stop = None if keep else self._halt
            await self.p.leases.release(self.lease_name, to=plan.handover_to, stop=stop)
            changed = True
        return changed

    async def _become_primary(self, interpret: ReplicatedInterpret, run: Run, token: int) -> bool:
        ctx = self._ctx(token, self.deadline())
        # Counted as ours from here on, so that renewals move the deadline during the call
        # (a promotion may take longer than one renewal interval).
        self.run_token = token
        call = interpret.start_primary(ctx) if run is Run.START_PRIMARY else interpret.promote(ctx)
        outcome = await self._role_call(call, run.value)
        if not outcome.ok:
            self.run_token = None
            self._attempt_failed(outcome.message)
            return False
        self.crash_base, self.failures, self.failed_before, self.healthy_since = 0, 0, 0, None
        self._attempt_done()
        self.following = None
        if self.health is not None:
            self.health.started(ctx)
        await self._refresh_local()
        return True

    async def _become_replica(self, interpret: ReplicatedInterpret, plan: Plan) -> bool:
        target = plan.primary
        info = self._primary_info(target)
        ctx = self._ctx(target.token if target and target.token else 0, None)
        interpret.attach(ctx)
        if plan.run is Run.DEMOTE:
            call = interpret.demote(info)
        else:
            call = interpret.start_replica(ctx, info)
        outcome = await self._role_call(call, plan.run.value)
        if not outcome.ok:
            self._attempt_failed(outcome.message)
            return False
        self._attempt_done()
        if self.run_token is not None:
            self.run_token = None
            self.p.forget(self.name)
            if self.health is not None:
                self.health.stopped()
        if target is not None and target.serving_primary and target.token is not None:
            self.following, self.pointed = (target.agent, target.token), None
        elif target is not None:
            self.following, self.pointed = None, target.agent
        await self._refresh_local()
        return outcome.changed

    async def _refresh_local(self) -> None:
        """After a role change, report the new role at once (a promoted primary is what
        the replicas wait for), not one cycle later."""
        interpret = self.interpret
        if isinstance(interpret, ReplicatedInterpret):
            status = await self._bounded(interpret.status(), "status")
            if isinstance(status, ReplicationStatus):
                self.local = status

    def _primary_info(self, target: Replica | None) -> PrimaryInfo | None:
        """What the Interpret follows; ``extra["pending"]``: not writable yet (the lease
        holder about to be promoted): point to it, check nothing against it yet."""
        if target is None or target.host is None or target.port is None:
            return None
        site, _, node = target.agent.partition("/")
        extra = {} if target.serving_primary else {"pending": True}
        return PrimaryInfo(site, node, target.host, target.port, target.token or 0, extra)

    async def _role_call(self, call: Awaitable[Outcome], what: str) -> Outcome:
        """A role change, bounded by the Interpret's own ``role_timeout`` (copies take what
        they take; the primary's deadline is enforced by the Interpret itself)."""
        interpret = self.interpret
        bound = interpret.role_timeout if isinstance(interpret, ReplicatedInterpret) else 60.0
        try:
            return await asyncio.wait_for(call, bound)
        except TimeoutError:
            return Outcome.failed(f"{what} did not finish within {bound:g}s")

    def _attempt_failed(self, message: str) -> None:
        """A start or role change failed. Counted like crashes: ``max_failures`` in a row
        give the application up here, so that another site gets to try; the next attempt
        waits a backoff that doubles each time."""
        self.failures += 1
        self.start_failed = message
        self.backoff_until = self.p.clock() + self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)

    def _attempt_done(self) -> None:
        self.start_failed = None
        self.backoff = FIRST_BACKOFF

    async def answer(self, term: int) -> None:
        """A new holder asked how far we reached (its poll for ``term``): observe now, after
        the question arrived, and say so at once (the report is gossiped immediately)."""
        interpret = self.interpret
        if self.answering or not isinstance(interpret, ReplicatedInterpret) or self.done:
            return
        self.answering = True
        try:
            status = await self._bounded(interpret.status(), "status")
            if isinstance(status, ReplicationStatus):
                self.local = status
            self.answered = term
            report = dataclasses.replace(self.report, replication=self._replication_report())
            self._set_report(report, urgent=True)
        finally:
            self.answering = False
