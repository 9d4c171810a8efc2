"""The control loop's one decision per application per cycle: a pure function.

``decide(name, snapshot)`` looks at what is desired (the Application), what this agent may
do (its lease, checked against *its own* clock) and what runs (the workload, and other
agents' live instances), and returns a ``Plan`` with one sentence saying why. Every rule is
here; the runner only carries plans out. The rules, in order:

1. deleted, not placed here, fenced, drained, cooling down, given up (max failures or the
   health probe): stop, let the lease go, do not contend;
2. SplitBrainAllowed with a running duplicate elsewhere: ``reconcile`` picks the survivor;
   a loser stops and hands the lease to the winner if it holds it;
3. a valid lease: run (start = promote + apply with the fencing token and deadline); a
   failed start is retried after its backoff;
4. no valid lease: AbsoluteConsistency stops (the fence already killed it at the deadline),
   SplitBrainAllowed keeps serving, partitioned, until it learns of a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.controller.model import (
    QUIET_REASONS,
    Event,
    InstanceState,
    PeerInstance,
    Plan,
    Policy,
    Release,
    Run,
    Snapshot,
)


def preferred(
    token: int | None, agent: str, other_token: int | None, other_agent: str, policy: Policy
) -> bool:
    """True when ``(token, agent)`` survives against ``(other_token, other_agent)``.

    keep-newest keeps the higher fencing token, keep-oldest the lower; an instance without a
    token loses; equal tokens (never two holders, but be total) fall back to the agent id.
    """
    if token is None or other_token is None:
        if token is None and other_token is None:
            return agent < other_agent
        return other_token is None
    if token == other_token:
        return agent < other_agent
    return token > other_token if policy is Policy.KEEP_NEWEST else token < other_token


def winner(
    token: int | None, agent: str, peers: Iterable[PeerInstance], policy: Policy
) -> PeerInstance | None:
    """The running peer that beats us, or None when we survive reconcile."""
    best: PeerInstance | None = None
    best_token, best_agent = token, agent
    for peer in peers:
        if not peer.running:
            continue
        if not preferred(best_token, best_agent, peer.token, peer.agent, policy):
            best, best_token, best_agent = peer, peer.token, peer.agent
    return best


def _off(
    name: str,
    s: Snapshot,
    state: InstanceState,
    why: str,
    event: Event,
    *,
    give_up: bool = False,
    retry_at: float | None = None,
) -> Plan:
    """Not wanted here: stop whatever runs and let the lease go."""
    busy = s.workload.running or s.lease.held
    if not busy:
        return Plan(
            state=state,
            sentence=f"{name}: {why}; nothing runs on {s.agent}",
            want=False,
            run=Run.STOP,
            give_up=give_up,
            retry_at=retry_at,
            done=not s.present and not s.wanted,
        )
    tail = " and releasing the lease" if s.lease.held else ""
    return Plan(
        state=state,
        sentence=f"{name}: {why}; stopping on {s.agent}{tail}",
        want=False,
        run=Run.STOP,
        release=Release.RELEASE if s.lease.held else Release.NONE,
        event=event,
        event_token=s.workload.token if s.workload.running else s.lease.token,
        give_up=give_up,
        retry_at=retry_at,
    )


def decide(name: str, s: Snapshot) -> Plan:
    wl, lease = s.workload, s.lease
    if not s.present:
        return _off(name, s, InstanceState.STOPPED, "application deleted", Event.STOPPED)
    if not s.eligible:
        why = f"site {s.site} not in placement"
        return _off(name, s, InstanceState.STOPPED, why, Event.STOPPED)
    if s.fenced:
        return _off(name, s, InstanceState.FENCED, "fenced by command", Event.FENCED)
    if s.drained:
        return _off(name, s, InstanceState.STANDBY, f"site {s.site} drained", Event.DRAINED)
    if s.now < s.cooldown_until:
        return _off(
            name,
            s,
            InstanceState.FAILED,
            "gave up here; cooling down so another site can try",
            Event.GAVE_UP,
            retry_at=s.cooldown_until,
        )
    if s.unhealthy is not None:
        why = f"{s.unhealthy}; giving it up here"
        return _off(name, s, InstanceState.FAILED, why, Event.GAVE_UP, give_up=True)
    if s.failures >= s.max_failures:
        why = f"failed {s.failures} times in a row (max {s.max_failures}), letting another site try"
        return _off(name, s, InstanceState.FAILED, why, Event.GAVE_UP, give_up=True)

    valid = lease.valid(s.now)

    if not s.consistent and wl.running:
        beat = winner(wl.token, s.agent, s.peers, s.policy)
        if beat is not None:
            to = beat.agent if lease.held and valid else None
            return Plan(
                state=InstanceState.STANDBY,
                sentence=(
                    f"{name}: duplicate after partition; {s.policy.value} keeps token "
                    f"{beat.token} on {beat.agent}, stopping token {wl.token} on {s.agent}"
                ),
                want=False,
                run=Run.STOP,
                release=Release.HANDOVER
                if to
                else (Release.RELEASE if lease.held else Release.NONE),
                handover_to=to,
                event=Event.RECONCILED,
                event_token=wl.token,
            )

    if valid:
        token = lease.token
        if wl.running and s.consistent and wl.token != token:
            return Plan(
                state=InstanceState.STANDBY,
                sentence=(
                    f"{name}: running with token {wl.token} but the lease is now token "
                    f"{token}; stopping on {s.agent} to restart fenced"
                ),
                want=True,
                run=Run.STOP,
                event=Event.RESTARTING,
                event_token=wl.token,
            )
        if wl.running:
            return Plan(
                state=InstanceState.RUNNING,
                sentence=f"{name}: holding lease token {token}, running on {s.agent}",
                want=True,
                deadline=s.consistent,
            )
        if not s.consistent:
            beat = winner(token, s.agent, s.peers, s.policy)
            if beat is not None:
                return Plan(
                    state=InstanceState.STANDBY,
                    sentence=(
                        f"{name}: token {beat.token} still runs on {beat.agent} and "
                        f"{s.policy.value} keeps it; handing lease token {token} over"
                    ),
                    want=False,
                    run=Run.STOP,
                    release=Release.HANDOVER,
                    handover_to=beat.agent,
                    event=Event.HANDOVER,
                    event_token=token,
                )
        if wl.start_failed is not None and s.now < s.backoff_until:
            return Plan(
                state=InstanceState.FAILED,
                sentence=(
                    f"{name}: holding lease token {token}; start failed ({wl.start_failed}), "
                    "retrying after a backoff"
                ),
                want=True,
                event=Event.START_FAILED,
                event_token=token,
                retry_at=s.backoff_until,
            )
        return Plan(
            state=InstanceState.RUNNING,
            sentence=f"{name}: acquired lease token {token}, starting on {s.agent}",
            want=True,
            run=Run.START,
            event=Event.STARTED,
            event_token=token,
            deadline=s.consistent,
        )

    if wl.running:
        if s.consistent:
            return Plan(
                state=InstanceState.STANDBY,
                sentence=(
                    f"{name}: lease token {wl.token} is no longer valid (AbsoluteConsistency); "
                    f"stopping on {s.agent}"
                ),
                want=True,
                run=Run.STOP,
                event=Event.LEASE_LOST,
                event_token=wl.token,
            )
        return Plan(
            state=InstanceState.RUNNING,
            sentence=(
                f"{name}: lease lost, still serving token {wl.token} on {s.agent} "
                "(SplitBrainAllowed, partitioned)"
            ),
            want=True,
            event=Event.PARTITIONED,
            event_token=wl.token,
            partitioned=True,
        )
    someone_runs = any(p.running for p in s.peers)
    failed = wl.failed and wl.reason not in QUIET_REASONS
    holder = lease.holder or "nobody"
    return Plan(
        state=InstanceState.FAILED if failed else InstanceState.STANDBY,
        sentence=f"{name}: standby on {s.agent}; lease held by {holder}",
        want=s.consistent or not someone_runs,
        run=Run.STOP,
    )
