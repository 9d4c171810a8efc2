"""The control loop's one decision per application per cycle: a pure function.

``decide(name, snapshot)`` looks at what is desired (the Application), what this agent may
do (its lease, checked against *its own* monotonic clock) and what runs (the workload, and
other agents' instances from their heartbeats), and returns what to do plus one sentence
saying why. The rules, in order:

1. deleted, not placed here, fenced, drained, cooling down after ``max_failures``:
   stop, let the lease go, do not contend;
2. SplitBrainAllowed with a running duplicate elsewhere: ``reconcile`` picks the survivor;
   a loser stops and hands the lease to the winner if it holds it;
3. a valid lease: run (``start`` is promote + apply with the fencing token);
4. no valid lease: AbsoluteConsistency stops (the guard already killed it at the deadline),
   SplitBrainAllowed keeps serving, partitioned, and waits to learn of a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.controller.model import (
    Decision,
    InstanceState,
    PeerInstance,
    Policy,
    Run,
    Snapshot,
)

_QUIET_REASONS = frozenset({None, "stopped", "exited", "deadline", "agent-gone"})


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
    name: str, s: Snapshot, state: InstanceState, why: str, event: str, *, give_up: bool = False
) -> Decision:
    """Not wanted here: stop whatever runs and let the lease go."""
    busy = s.workload.running or s.lease.held
    if not busy:
        return Decision(
            want=False,
            run=Run.STOP,
            state=state,
            sentence=f"{name}: {why}; nothing runs on {s.agent}",
            give_up=give_up,
        )
    tail = " and releasing the lease" if s.lease.held else ""
    return Decision(
        want=False,
        run=Run.STOP,
        release=s.lease.held,
        state=state,
        event=event,
        sentence=f"{name}: {why}; stopping on {s.agent}{tail}",
        give_up=give_up,
    )


def decide(name: str, s: Snapshot) -> Decision:
    wl, lease = s.workload, s.lease
    if not s.present:
        return _off(name, s, InstanceState.STOPPED, "application deleted", "stopped")
    if not s.eligible:
        return _off(name, s, InstanceState.STOPPED, f"site {s.site} not in placement", "stopped")
    if s.fenced:
        return _off(name, s, InstanceState.FENCED, "fenced by command", "fenced")
    if s.drained:
        return _off(name, s, InstanceState.STANDBY, f"site {s.site} drained", "drained")
    if s.now < s.cooldown_until:
        left = s.cooldown_until - s.now
        return _off(
            name,
            s,
            InstanceState.FAILED,
            f"gave up after failures, cooling down {left:.1f}s",
            "gave-up",
        )
    if s.failures >= s.max_failures:
        why = f"failed {s.failures} times in a row (max {s.max_failures}), letting another site try"
        return _off(name, s, InstanceState.FAILED, why, "gave-up", give_up=True)

    valid = lease.valid(s.now)

    if not s.consistent and wl.running:
        beat = winner(wl.token, s.agent, s.peers, s.policy)
        if beat is not None:
            to = beat.agent if lease.held and valid else None
            return Decision(
                want=False,
                run=Run.STOP,
                release=lease.held and to is None,
                handover_to=to,
                state=InstanceState.STANDBY,
                event="reconciled",
                sentence=(
                    f"{name}: duplicate after partition; {s.policy.value} keeps token "
                    f"{beat.token} on {beat.agent}, stopping token {wl.token} on {s.agent}"
                ),
            )

    if valid:
        token = lease.token
        if wl.running and s.consistent and wl.token != token:
            return Decision(
                want=True,
                run=Run.STOP,
                state=InstanceState.STANDBY,
                event="restarting",
                sentence=(
                    f"{name}: running with token {wl.token} but the lease is now token {token}; "
                    f"stopping on {s.agent} to restart fenced"
                ),
            )
        if wl.running:
            return Decision(
                want=True,
                run=Run.KEEP,
                state=InstanceState.RUNNING,
                sentence=f"{name}: holding lease token {token}, running on {s.agent}",
            )
        if not s.consistent:
            beat = winner(token, s.agent, s.peers, s.policy)
            if beat is not None:
                return Decision(
                    want=False,
                    run=Run.STOP,
                    handover_to=beat.agent,
                    state=InstanceState.STANDBY,
                    event="handover",
                    sentence=(
                        f"{name}: token {beat.token} still runs on {beat.agent} and "
                        f"{s.policy.value} keeps it; handing lease token {token} over"
                    ),
                )
        if s.now < s.backoff_until:
            return Decision(
                want=True,
                run=Run.KEEP,
                state=InstanceState.FAILED,
                sentence=(
                    f"{name}: holding lease token {token}; start failed ({wl.detail}), retrying "
                    f"in {s.backoff_until - s.now:.1f}s"
                ),
            )
        return Decision(
            want=True,
            run=Run.START,
            state=InstanceState.RUNNING,
            event="started",
            sentence=f"{name}: acquired lease token {token}, starting on {s.agent}",
        )

    # No valid lease.
    if wl.running:
        if s.consistent:
            return Decision(
                want=True,
                run=Run.STOP,
                state=InstanceState.STANDBY,
                event="lease-lost",
                sentence=(
                    f"{name}: lease token {wl.token} is no longer valid (AbsoluteConsistency); "
                    f"stopping on {s.agent}"
                ),
            )
        return Decision(
            want=True,
            run=Run.KEEP,
            state=InstanceState.RUNNING,
            event="partitioned",
            sentence=(
                f"{name}: lease lost, still serving token {wl.token} on {s.agent} "
                "(SplitBrainAllowed, partitioned)"
            ),
        )
    someone_runs = any(p.running for p in s.peers)
    want = s.consistent or not someone_runs
    failed = wl.failed and wl.reason not in _QUIET_REASONS
    holder = lease.holder or "nobody"
    return Decision(
        want=want,
        run=Run.STOP,
        state=InstanceState.FAILED if failed else InstanceState.STANDBY,
        sentence=f"{name}: standby on {s.agent}; lease held by {holder}",
    )
