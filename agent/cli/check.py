"""``harmony-agent check``: would these Applications run here? Nothing is written.

Documents are validated exactly as ``apply`` does; with ``--config`` each Score is also
checked against the capabilities of that agent's topology (``scores.check``), and a site
the config names but the placement excludes is reported, since that agent would never
run the application.
"""

from __future__ import annotations

import click

from agent.cli.common import EXIT_BAD_INPUT, fail


@click.command()
@click.option("-f", "--filename", "path", required=True, help="Application YAML; - reads stdin.")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="An agent configuration: check against its site and topology.",
)
def check(path: str, config_path: str | None) -> None:
    """Validate Applications, optionally against an agent's topology.

    With --config, each Score is also checked against the capabilities of that agent's
    topology. Nothing is written and no mesh is needed.
    """
    from agent.cli.apply import load_applications

    apps = load_applications(path)
    if config_path is None:
        for app in apps:
            click.echo(f"application/{app.name} valid")
        return
    from agent.config import ConfigError, load_config
    from scores.check import missing_capabilities

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    problems: list[str] = []
    for app in apps:
        missing = missing_capabilities(
            app.spec.score, config.topology, app=app.name, site=config.site
        )
        problems += missing
        if missing:
            continue
        note = ""
        if config.site not in app.spec.placement.sites:
            note = f" (site {config.site} is not in its placement: this agent will not run it)"
        click.echo(
            f"application/{app.name} valid on {config.agent_id} ({config.topology.kind}){note}"
        )
    if problems:
        for line in problems[:-1]:
            click.echo(f"harmony-agent: error: {line}", err=True)
        fail(problems[-1], EXIT_BAD_INPUT)
