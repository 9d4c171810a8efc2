"""Roles of a replicated application: who is primary, who follows whom, who is promoted.

A pure function like ``decide`` (which calls it once the common rules let the application
run here): the runner observes the local instance and reads the other agents' reports, this
module returns one ``Plan`` and one sentence. The lease decides who is primary; everything
else follows from what the instances report of themselves.

Holder (the lease is valid on our own clock):

* H1 the primary runs with our token: keep it, with its synchronous replicas;
* H2 a primary runs with an older token (we hold a new term): take it over with ours;
* H3 no data here: hand the lease to a live instance that has data; never initialise an
  empty cluster while the mesh has seen data of this one; otherwise initialise the first
  primary;
* H4 data, not running: start it as a standby alone, so it replays what it has;
* H5 a running replica: ask every live replica how far it reached (a *poll*, answered
  through gossip with a fresh observation: causally after the old primary's deadline), wait
  up to ``poll_wait`` for the answers, hand the lease to a replica that reached further,
  refuse beyond ``maximum_lag_on_failover`` of the *floor* (the furthest position any
  report ever showed, stale ones included: Patroni's last leader position), else promote.

Not holder:

* F1 a running primary: demote it, to a replica of the newest live primary if one is
  known, else stop it until one is (the fence has normally killed it at the deadline);
* F2 no data: copy from the primary if one is known; otherwise contend only while no
  instance anywhere has data (the first primary of a new application);
* F3 data, not running: start as a replica of the primary (rewinding a former primary), or
  as a standby alone until a primary is known;
* F4 a running replica: re-point it when the primary changed, and to a new holder as soon
  as it polls (it is about to be promoted; the replica streams from it once it is
  writable); contend for the lease only as a candidate: within ``maximum_lag_on_failover``
  of the floor and, once no primary is live, not behind another live candidate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from agent.controller.model import (
    QUIET_REASONS,
    ROLE_ACTIONS,
    Event,
    InstanceState,
    Plan,
    Release,
    Replica,
    Roles,
    Run,
    Snapshot,
)


def lsn(position: int | None) -> str:
    """A position as PostgreSQL writes an LSN (``0/3000060``)."""
    return "?" if position is None else f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def where(r: Replica) -> str:
    if r.at is None:
        return "position unknown"
    return f"timeline {r.timeline} at {lsn(r.position)}"


def tl(r: Replica) -> str:
    """Where, without the position: steady sentences must not change with every write (a
    new sentence is logged)."""
    return "position unknown" if r.at is None else f"timeline {r.timeline}"


def floor(peers: Iterable[Replica]) -> Replica | None:
    """The report (live or stale) that shows the furthest history of this application."""
    known = [p for p in peers if p.at is not None]
    return max(known, key=lambda p: (p.at, p.agent)) if known else None


def ineligible(me: Replica, top: Replica | None, max_lag: int, *, exact: bool = True) -> str | None:
    """Why ``me`` may not be promoted (None: it may), against the floor ``top``; without
    ``exact`` the reason leaves the moving numbers out (a steady sentence)."""
    if me.at is None:
        return "its position is unknown"
    if top is None or top.at is None:
        return None
    assert me.timeline is not None and me.position is not None
    assert top.timeline is not None and top.position is not None
    if me.timeline < top.timeline:
        return f"it is on timeline {me.timeline}, {top.agent} reported timeline {top.timeline}" + (
            f" (at {lsn(top.position)})" if exact else ""
        )
    if me.timeline > top.timeline:
        return None
    lag = top.position - me.position
    if lag > max_lag:
        if not exact:
            return (
                f"it lags {top.agent}'s last reported position by more than "
                f"maximum_lag_on_failover ({max_lag} bytes)"
            )
        return (
            f"it is {lag} bytes behind {top.agent}'s last reported position "
            f"{lsn(top.position)} (maximum_lag_on_failover {max_lag})"
        )
    return None


def primary(peers: Iterable[Replica]) -> Replica | None:
    """The live primary to follow: the running one with the highest token, and only if no
    report (stale ones included) shows a newer term."""
    peers = list(peers)
    newest = max((p.token for p in peers if p.role == "primary" and p.token), default=None)
    serving = [p for p in peers if p.live and p.serving_primary and p.token is not None]
    if not serving:
        return None
    best = max(serving, key=lambda p: (p.token or 0, p.agent))
    return best if newest is None or (best.token or 0) >= newest else None


def promoting(peers: Iterable[Replica]) -> Replica | None:
    """The live lease holder that polls the replicas (about to be promoted), as the primary
    to follow: its token is the polled term."""
    found = [p for p in peers if p.live and p.polling is not None and p.has_data]
    if not found:
        return None
    best = max(found, key=lambda p: (p.polling or 0, p.agent))
    return dataclasses.replace(best, token=best.polling)


def sync_names(peers: Iterable[Replica]) -> tuple[str, ...]:
    """Every other instance a synchronous primary may wait for (``ANY 1 (...)``)."""
    return tuple(sorted({p.name for p in peers if p.name}))


def _agent(following: tuple[str, int] | None) -> str | None:
    return following[0] if following else None


def _key(r: Replica) -> tuple[tuple[int, int], str]:
    assert r.at is not None
    return (r.at, r.agent)


def candidate(me: Replica, r: Roles) -> tuple[bool, str]:
    """Does a running replica contend for the lease? (and the clause that says why)"""
    top = floor(r.peers)
    why = ineligible(me, top, r.max_lag, exact=False)
    if why is not None:
        return False, f"not contending: {why}"
    if primary(r.peers) is not None:
        return True, "a candidate if the primary fails"
    better = [
        p
        for p in r.peers
        if p.live
        and p.running
        and p.role == "replica"
        and p.at is not None
        and me.at is not None
        and p.at > me.at
        and ineligible(p, top, r.max_lag) is None
    ]
    if better:
        best = max(better, key=_key)
        return False, f"not contending: {best.agent} reached further"
    return True, "contending for the lease"


def decide_roles(name: str, s: Snapshot, r: Roles) -> Plan:
    plan = _holder(name, s, r) if s.lease.valid(s.now) else _follower(name, s, r)
    wl = s.workload
    if plan.run in ROLE_ACTIONS and wl.start_failed is not None and s.now < s.backoff_until:
        return Plan(
            state=InstanceState.FAILED,
            sentence=(
                f"{name}: {plan.run.value} on {s.agent} failed ({wl.start_failed}); "
                "retrying after a backoff"
            ),
            want=plan.want and s.lease.held,
            event=Event.START_FAILED,
            event_token=s.lease.token,
            retry_at=s.backoff_until,
            deadline=plan.deadline,
        )
    return plan


def _holder(name: str, s: Snapshot, r: Roles) -> Plan:
    me, token = r.local, s.lease.token
    assert token is not None
    sync = sync_names(r.peers)
    if me.serving_primary:
        if s.workload.token == token:  # H1
            return Plan(
                state=InstanceState.RUNNING,
                sentence=f"{name}: holding lease token {token}, primary on {s.agent} ({tl(me)})",
                want=True,
                deadline=True,
                sync_standbys=sync,
            )
        return Plan(  # H2
            state=InstanceState.RUNNING,
            sentence=(
                f"{name}: a primary runs on {s.agent} without lease token {token}; "
                "taking it over with that token"
            ),
            want=True,
            run=Run.START_PRIMARY,
            event=Event.STARTED,
            event_token=token,
            deadline=True,
            sync_standbys=sync,
        )
    if not me.has_data and s.workload.token == token:
        return Plan(
            state=InstanceState.RUNNING,
            sentence=(
                f"{name}: holding lease token {token}; cannot read the state of the primary "
                f"started on {s.agent} with it; keeping it"
            ),
            want=True,
            deadline=True,
        )
    if not me.has_data:  # H3
        donors = [p for p in r.peers if p.live and p.has_data]
        if donors:
            best = max(donors, key=lambda p: (p.at or (-1, -1), p.agent))
            return Plan(
                state=InstanceState.STOPPED,
                sentence=(
                    f"{name}: no data on {s.agent} while {best.agent} has ({where(best)}); "
                    f"handing lease token {token} over"
                ),
                want=False,
                release=Release.HANDOVER,
                handover_to=best.agent,
                event=Event.HANDOVER,
                event_token=token,
            )
        seen = floor(r.peers) or next((p for p in r.peers if p.has_data), None)
        if seen is not None:
            return Plan(
                state=InstanceState.STOPPED,
                sentence=(
                    f"{name}: not initialising an empty cluster on {s.agent}: the mesh saw "
                    f"data of {name} on {seen.agent} ({where(seen)}); waiting for an instance "
                    "with data"
                ),
                want=False,
                release=Release.RELEASE,
                event=Event.NOT_PROMOTED,
                event_token=token,
            )
        return Plan(
            state=InstanceState.RUNNING,
            sentence=f"{name}: acquired lease token {token}, initialising the first primary on "
            f"{s.agent}",
            want=True,
            run=Run.START_PRIMARY,
            event=Event.STARTED,
            event_token=token,
            deadline=True,
            sync_standbys=sync,
        )
    if not me.running:  # H4
        return Plan(
            state=InstanceState.STANDBY,
            sentence=(
                f"{name}: holding lease token {token}; starting the {me.role} data on "
                f"{s.agent} as a standby to see how far it reaches"
            ),
            want=True,
            run=Run.START_REPLICA,
            retry_at=s.now + 0.1,
        )
    # H5: a running replica holds the lease.
    asked = [p for p in r.peers if p.live and p.has_data]
    pending = [p for p in asked if p.answered != token]
    if pending and s.now < r.held_since + r.poll_wait:
        names = ", ".join(sorted(p.agent for p in pending))
        return Plan(
            state=InstanceState.STANDBY,
            sentence=(
                f"{name}: holding lease token {token}; asking {names} how far they reached "
                "before promoting"
            ),
            want=True,
            run=Run.POLL,
            retry_at=min(r.held_since + r.poll_wait, s.now + 0.25),
        )
    ahead = [
        p
        for p in asked
        if p.answered == token
        and p.running
        and p.role == "replica"
        and p.at is not None
        and me.at is not None
        and p.at > me.at
    ]
    if ahead:
        best = max(ahead, key=_key)
        return Plan(
            state=InstanceState.STANDBY,
            sentence=(
                f"{name}: {best.agent} reached further ({where(best)}) than {s.agent} "
                f"({where(me)}); handing lease token {token} to it"
            ),
            want=False,
            release=Release.HANDOVER,
            handover_to=best.agent,
            event=Event.HANDOVER,
            event_token=token,
        )
    why = ineligible(me, floor(r.peers), r.max_lag)
    if why is not None:
        return Plan(
            state=InstanceState.STANDBY,
            sentence=f"{name}: not promoting the replica on {s.agent}: {why}",
            want=False,
            release=Release.RELEASE,
            event=Event.NOT_PROMOTED,
            event_token=token,
        )
    silent = f" ({len(pending)} did not answer)" if pending else ""
    return Plan(
        state=InstanceState.RUNNING,
        sentence=(
            f"{name}: acquired lease token {token}; promoting the replica on {s.agent} "
            f"({where(me)}){silent}"
        ),
        want=True,
        run=Run.PROMOTE,
        event=Event.PROMOTED,
        event_token=token,
        deadline=True,
        sync_standbys=sync,
    )


def _follower(name: str, s: Snapshot, r: Roles) -> Plan:
    plan = _follow(name, s, r)
    if plan.run is Run.KEEP and plan.state is InstanceState.STANDBY:
        # A replica runs with the names it will wait for once promoted (no reload then).
        return dataclasses.replace(plan, sync_standbys=sync_names(r.peers))
    return plan


def _follow(name: str, s: Snapshot, r: Roles) -> Plan:
    me = r.local
    prim = primary(r.peers)
    to = f"a replica of {prim.agent}" if prim else "stopped until a primary is known"
    if me.serving_primary:  # F1
        lost = s.workload.token
        return Plan(
            state=InstanceState.STANDBY,
            sentence=(
                f"{name}: lease token {lost} is no longer valid; demoting the primary on "
                f"{s.agent} ({to})"
            ),
            want=False,
            run=Run.DEMOTE,
            primary=prim,
            event=Event.LEASE_LOST if lost is not None else Event.DEMOTED,
            event_token=lost,
        )
    failed = s.workload.failed and s.workload.reason not in QUIET_REASONS
    if not me.has_data:  # F2
        if prim is not None:
            return Plan(
                state=InstanceState.STANDBY,
                sentence=f"{name}: no data on {s.agent}; copying a replica from {prim.agent}",
                want=False,
                run=Run.START_REPLICA,
                primary=prim,
                event=Event.FOLLOWING,
                event_token=prim.token,
            )
        first = not any(p.has_data for p in r.peers)
        tail = (
            "no instance has data yet: contending to initialise the first primary"
            if first
            else "waiting for a primary to copy from"
        )
        return Plan(
            state=InstanceState.FAILED if failed else InstanceState.STOPPED,
            sentence=f"{name}: no data on {s.agent}; {tail}",
            want=first,
            run=Run.KEEP,
        )
    if not me.running:  # F3
        what = f"a replica of {prim.agent}" if prim else "a standby alone until a primary is known"
        return Plan(
            state=InstanceState.STANDBY,
            sentence=f"{name}: starting the {me.role} data on {s.agent} as {what}",
            want=False,
            run=Run.START_REPLICA,
            primary=prim,
            event=Event.FOLLOWING if prim else None,
            event_token=prim.token if prim else None,
        )
    if prim is not None and r.following != (prim.agent, prim.token):  # F4
        return Plan(
            state=InstanceState.STANDBY,
            sentence=f"{name}: pointing the replica on {s.agent} to {prim.agent} (token "
            f"{prim.token})",
            want=False,
            run=Run.START_REPLICA,
            primary=prim,
            event=Event.FOLLOWING,
            event_token=prim.token,
        )
    soon = promoting(r.peers)
    if prim is None and soon is not None and soon.agent not in (r.pointed, _agent(r.following)):
        # The new holder asked how far we reached: it is about to be promoted. Pointing to
        # it now (it accepts us only once writable) saves the promoted primary a round of
        # re-pointing before its first synchronous commit.
        return Plan(
            state=InstanceState.STANDBY,
            sentence=f"{name}: pointing the replica on {s.agent} to {soon.agent}, the new "
            f"lease holder (token {soon.token})",
            want=False,
            run=Run.START_REPLICA,
            primary=soon,
        )
    want, why = candidate(me, r)
    following = f"following {prim.agent}" if prim else "no primary known"
    return Plan(
        state=InstanceState.STANDBY,
        sentence=f"{name}: replica on {s.agent} ({tl(me)}, {following}); {why}",
        want=want,
    )


def switchover_target(
    me: Replica, peers: Iterable[Replica], sites: list[str], max_lag: int
) -> tuple[str | None, str]:
    """A planned failover's target: the live running replica, furthest along, at the first
    of ``sites`` that has one close enough to ``me`` (the primary); or why there is none.

    The old primary stops first and the target promotes only once it has what the old one
    wrote last (``_holder`` H5), so a target further behind than ``max_lag`` would leave the
    application without a primary for as long as it takes to catch up: refused up front.
    """
    peers = list(peers)
    problems = []
    for site in sites:
        found = [
            p
            for p in peers
            if p.agent.split("/", 1)[0] == site and p.live and p.running and p.role == "replica"
        ]
        if not found:
            problems.append(f"no replica runs on {site}")
            continue
        best = max(found, key=lambda p: (p.at or (-1, -1), p.agent))
        if me.at is not None and best.at is None:
            problems.append(f"{best.agent} reports no position")
        elif me.at is not None and best.at is not None and best.at[0] != me.at[0]:
            problems.append(f"{best.agent} is on timeline {best.at[0]}, the primary on {me.at[0]}")
        elif me.at is not None and best.at is not None and me.at[1] - best.at[1] > max_lag:
            lag = me.at[1] - best.at[1]
            problems.append(
                f"{best.agent} is {lag} bytes behind (maximum_lag_on_failover {max_lag})"
            )
        else:
            return best.agent, ""
    return None, "; ".join(problems) or "no other site in placement"
