"""What ``/metrics`` exports: one prefix (``harmony_``), no ``_created`` series.

Most values are read from the running agent at scrape time by two collectors, so the
control loop does no metrics bookkeeping and a scrape always shows the truth of that
instant: ``AgentCollector`` (this agent: readiness, quorum, session validity, how many
live agents each site has) and ``AppCollector`` (one label set per application placed on
this agent's site, every series present from the moment the application appears and gone
once it is deleted). Their series carry the agent's ``site`` and ``node``. The lease
engine's own counters live in ``mesh.metrics`` (process-wide, no labels), the counters of
things that happen (failovers, restarts...) in ``agent.app_metrics``. docs/operations.md
lists every metric.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agent import __version__
from agent.app_metrics import RESULTS, TALLIES, VERBS
from mesh.clock import boottime

if TYPE_CHECKING:
    from agent.daemon import Agent

PREFIX = "harmony_"
STATES = ("running", "standby", "stopped", "fenced", "failed")
"""``InstanceState`` values (CONTRACT section 6)."""


disable_created_metrics()  # type: ignore[no-untyped-call]


class Tally:
    """A counter the collector reads (``inc`` from the event loop, no lock needed)."""

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


MESH_DISCONNECTS = Tally()
LOOP_CYCLES = Tally()


def _gauge(name: str, doc: str, labels: Iterable[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Iterable[str]) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


class AgentCollector(Collector):
    """This agent, read at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        site, node = a.config.site, a.config.node
        me = [site, node]
        now = boottime()

        info = _gauge("agent_info", "Always 1: this agent's version", ["site", "node", "version"])
        info.add_metric([*me, __version__], 1)
        yield info
        facts = {
            "ready": ("1 while /readyz answers 200", a.readiness()[0]),
            "healthy": ("1 while /healthz answers 200 (the loop runs)", a.liveness()[0]),
            "in_quorum": ("1 while a quorum of lease stores has our session", a.in_quorum()),
            "mesh_connected": ("1 while connected to a NATS server", a.connection.connected),
        }
        for name, (doc, value) in facts.items():
            g = _gauge(name, doc, ["site", "node"])
            g.add_metric(me, 1 if value else 0)
            yield g
        for name, doc, number in (
            (
                "uptime_seconds",
                "Seconds since the agent started",
                time.monotonic() - a.started_mono,
            ),
            ("lease_ttl_seconds", "The configured lease ttl", a.ttl),
        ):
            g = _gauge(name, doc, ["site", "node"])
            g.add_metric(me, number)
            yield g

        view = a.session.view() if a.session is not None else None
        valid = _gauge(
            "session_remaining_seconds",
            "Seconds until the session stops being valid if no renewal lands (0: not valid)",
            ["site", "node"],
        )
        valid.add_metric(me, max(0.0, view.deadline() - now) if view is not None else 0.0)
        yield valid
        stores = _gauge(
            "session_store_fresh",
            "1 while our session is live and fresh in this lease store",
            ["site", "node", "store"],
        )
        for store, s in sorted(view.stores.items()) if view is not None else ():
            stores.add_metric([*me, store], 1 if s.live and s.fresh_until > now else 0)
        yield stores

        for name, doc, tally in (
            ("mesh_disconnects", "Disconnections from the mesh", MESH_DISCONNECTS),
            ("control_loop_cycles", "Control-loop cycles run", LOOP_CYCLES),
        ):
            c = _counter(name, doc, ["site", "node"])
            c.add_metric(me, tally.value)
            yield c

        live = _gauge(
            "site_live_agents",
            "Agents of peer_site whose session this agent saw renewed within a ttl",
            ["site", "node", "peer_site"],
        )
        for peer_site, count in sorted(site_agents(a).items()):
            live.add_metric([*me, peer_site], count)
        yield live


def site_agents(a: Agent) -> dict[str, int]:
    """Live agents per site: every site of an application's placement, and ours, at 0
    when none is seen (a site that vanished from the mesh), plus any site seen alive."""
    counts: dict[str, int] = {a.config.site: 0}
    if a.controller is not None:
        for app in a.controller.desired.values():
            for s in app.spec.placement.sites:
                counts.setdefault(s, 0)
    if a.leases is not None:
        for agent_id in a.leases.live_agents():
            s = agent_id.split("/", 1)[0]
            counts[s] = counts.get(s, 0) + 1
    return counts


class AppCollector(Collector):
    """One label set per application this agent may run (its placement names our site,
    or something of it still runs or is held here), read from the controller."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        me = [a.config.site, a.config.node]
        labels = ["app", "site", "node"]
        info = _gauge(
            "app_info",
            "Always 1: the application's trait, failover strategy and Score kind",
            [*labels, "trait", "strategy", "kind"],
        )
        state = _gauge("app_state", "1 for the instance's current state here", [*labels, "state"])
        running = _gauge("app_running", "1 while the workload runs on this agent", labels)
        held = _gauge("app_lease_held", "1 while this agent holds the lease (or slot)", labels)
        token = _gauge(
            "app_fencing_token",
            "Fencing token of the instance here (running, else the lease held; 0: none)",
            labels,
        )
        remaining = _gauge(
            "app_lease_remaining_seconds",
            "Held leases only: seconds until this agent stops holding the lease (and, under "
            "AbsoluteConsistency, the fence kills the workload) unless a renewal lands",
            labels,
        )
        counters = {
            "failovers": _counter(
                "app_failovers", "Leases taken over here from another agent", labels
            ),
            "handovers": _counter(
                "app_handovers", "Leases handed over to this agent by their holder", labels
            ),
            "restarts": _counter("app_restarts", "Workload restarts here after a crash", labels),
            "give_ups": _counter(
                "app_give_ups",
                "Times this agent gave the application up (failures or health probe)",
                labels,
            ),
            "step_failures": _counter(
                "app_step_failures",
                "Controller cycles for the application that raised (a bug or an unhandled "
                "fault; status shows the error until a cycle works again)",
                labels,
            ),
        }
        ctl, leases = a.controller, a.leases
        if ctl is not None and leases is not None:
            held_now = leases.held()
            names = self.names(held_now)
            TALLIES.prune(names)
            now = boottime()
            anchored = a.session.view().anchored_deadline() if a.session is not None else None
            for name in names:
                lv = [name, *me]
                runner = ctl.runners.get(name)
                spec = ctl.desired.get(name)
                if spec is not None:
                    s = spec.spec
                    kind = s.score.kind
                    info.add_metric([*lv, s.trait.value, s.failover.strategy.value, kind], 1)
                report = runner.report if runner is not None else None
                current = report.state.value if report is not None else "standby"
                for value in STATES:
                    state.add_metric([*lv, value], 1 if value == current else 0)
                is_running = (
                    runner is not None and runner.run_token is not None and current == "running"
                )
                running.add_metric(lv, 1 if is_running else 0)
                lease = runner.lease_name if runner is not None else None
                holding = lease is not None and lease in held_now
                held.add_metric(lv, 1 if holding else 0)
                token.add_metric(lv, (report.token or 0) if report is not None else 0)
                if lease is not None and holding and runner is not None:
                    at = leases.deadline(lease)
                    deadline = runner.deadline()
                    if deadline is not None and deadline.follows_session and anchored is not None:
                        at = min(at, anchored)  # exactly what the fence follows
                    remaining.add_metric(lv, max(0.0, at - now))
                counts = TALLIES.app(name)
                for attr, family in counters.items():
                    family.add_metric(lv, getattr(counts, attr))
        yield from (info, state, running, held, token, remaining, *counters.values())

        commands = _counter(
            "commands",
            "Command-plane replies by verb and result",
            ["site", "node", "verb", "result"],
        )
        for verb in (*VERBS, "other"):
            for result in RESULTS:
                commands.add_metric([*me, verb, result], TALLIES.commands.get((verb, result), 0))
        yield commands

    def names(self, held: dict[str, int]) -> list[str]:
        """Applications placed on our site, and any that still runs or is held here (an
        application being deleted, or moved off our site, until it stopped)."""
        ctl = self.agent.controller
        if ctl is None:
            return []
        site = self.agent.config.site
        out = {n for n, app in ctl.desired.items() if site in app.spec.placement.sites}
        for n, r in ctl.runners.items():
            if r.run_token is not None or (r.lease_name is not None and r.lease_name in held):
                out.add(n)
        return sorted(out)


class _HarmonyOnly(Collector):
    """The module-level metrics of the default registry (``mesh.metrics``, the codec's
    rejected values), without the client library's ``python_*`` and ``process_*``."""

    def collect(self) -> Iterator[Metric]:
        for metric in REGISTRY.collect():
            if metric.name.startswith(PREFIX):
                yield metric


_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram", "unknown": "untyped"}


def _value(v: str) -> str:
    if "\\" in v or '"' in v or "\n" in v:
        v = v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def render(registry: CollectorRegistry) -> bytes:
    return render_families(registry.collect())


def render_families(families: Iterable[Metric]) -> bytes:
    """The text exposition format (0.0.4), as ``prometheus_client.generate_latest`` writes
    it, about twice as fast: the library validates and escapes every label *name* of every
    sample; ours are fixed valid names, so only label values are escaped. Pure, so it may
    run off the event loop on collected families. No ``_created``, ``_gsum`` or
    ``_gcount`` samples exist here (``disable_created_metrics``)."""
    out: list[str] = []
    for metric in families:
        name = metric.name + ("_total" if metric.type == "counter" else "")
        name += "_info" if metric.type == "info" else ""
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {_TYPES.get(metric.type, metric.type)}\n")
        for s in metric.samples:
            labels = ""
            if s.labels:
                pairs = ",".join(f'{k}="{_value(v)}"' for k, v in sorted(s.labels.items()))
                labels = "{" + pairs + "}"
            stamp = f" {int(float(s.timestamp) * 1000):d}" if s.timestamp is not None else ""
            value = floatToGoString(s.value)  # type: ignore[no-untyped-call]
            out.append(f"{s.name}{labels} {value}{stamp}\n")
    return "".join(out).encode()


def registry_for(agent: Agent) -> CollectorRegistry:
    """The registry ``/metrics`` serves for this agent."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_HarmonyOnly())
    registry.register(ProcessCollector(namespace="harmony", registry=None))
    registry.register(AgentCollector(agent))
    registry.register(AppCollector(agent))
    return registry
