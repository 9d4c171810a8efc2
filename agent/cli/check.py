"""``harmony-agent check``: would these Applications run here? Nothing is written.

Documents are validated exactly as ``apply`` does; with ``--config`` each Score is also
checked against the capabilities of that agent's topology (``scores.check``), its ``health:``
against the rules with that agent's lease ttl (``scores.health.health_rules``) and its exec
probe against that topology's host (``command -v`` over SSH), and a site the config names
but the placement excludes is reported, since that agent would never run the application.
Each application's line says whether its lease deadline is enforced outside the agent; an
AbsoluteConsistency application whose deadline is not gets a warning.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import click

from agent.cli.common import EXIT_BAD_INPUT, fail

if TYPE_CHECKING:
    from agent.application import Application
    from agent.config import AgentConfig
    from topologies.base import Topology


@click.command()
@click.option("-f", "--filename", "path", required=True, help="Application YAML; - reads stdin.")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="An agent configuration: check against its site, topology and lease ttl.",
)
def check(path: str, config_path: str | None) -> None:
    """Validate Applications, optionally against an agent's topology.

    With --config, each Score is also checked against the capabilities of that agent's
    topology and its health block against that agent's lease ttl. Nothing is written and
    no mesh is needed.
    """
    import asyncio

    from agent.cli.apply import load_applications
    from agent.config import ConfigError, load_config

    apps = load_applications(path)
    if config_path is None:
        for app in apps:
            click.echo(f"application/{app.name} valid")
        return
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    problems, warnings, lines = asyncio.run(_check(apps, config))
    for line in lines:
        click.echo(line)
    for line in warnings:
        click.echo(f"harmony-agent: warning: {line}", err=True)
    if problems:
        for line in problems[:-1]:
            click.echo(f"harmony-agent: error: {line}", err=True)
        fail(problems[-1], EXIT_BAD_INPUT)


async def _check(
    apps: list[Application], config: AgentConfig
) -> tuple[list[str], list[str], list[str]]:
    """(errors, warnings, one line per valid application)."""
    from agent.application import Strategy
    from scores.check import deadline_enforcement, missing_capabilities, probe_problems
    from scores.health import health_rules
    from topologies.build import build_topology
    from topologies.config import KubernetesConfig

    problems: list[str] = []
    warnings: list[str] = []
    lines: list[str] = []
    topology: Topology | None = None
    try:
        for app in apps:
            spec = app.spec
            missing = missing_capabilities(
                spec.score, config.topology, app=app.name, site=config.site
            )
            if missing:
                problems += missing
                continue
            consistent = spec.failover.strategy is Strategy.ABSOLUTE_CONSISTENCY
            rules = health_rules(
                spec.health,
                config.lease.ttl,
                margin=config.lease.effective_margin,
                score_kind=spec.score.kind if consistent else None,
            )
            problems += [f"{app.name}: {rule}" for rule in rules]
            if spec.health is not None and spec.health.probe is not None:
                if topology is None and not isinstance(config.topology, KubernetesConfig):
                    topology = build_topology(config.topology)
                for field, problem in await probe_problems(
                    spec.health, spec.score, topology or config.topology
                ):
                    if problem.startswith("could not check"):
                        warnings.append(f"{app.name}: {field}: {problem}")
                    else:
                        problems.append(f"{app.name}: {field}: {problem}")
            if rules or any(p.startswith(f"{app.name}: spec.health") for p in problems):
                continue
            enforced, note = deadline_enforcement(spec.score)
            where = f"on {config.agent_id} ({config.topology.kind})"
            deadline = note if consistent else "no lease deadline (SplitBrainAllowed)"
            placement = ""
            if config.site not in spec.placement.sites:
                placement = (
                    f" (site {config.site} is not in its placement: this agent will not run it)"
                )
            lines.append(f"application/{app.name} valid {where}{placement}; {deadline}")
            if consistent and not enforced:
                warnings.append(
                    f"{app.name}: AbsoluteConsistency on {config.topology.kind}: {note}"
                )
    finally:
        if topology is not None:
            with contextlib.suppress(Exception):
                await topology.close()
    return problems, warnings, lines
