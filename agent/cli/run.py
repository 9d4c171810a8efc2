"""``harmony-agent run``: the daemon in the foreground (systemd, a DaemonSet, a terminal)."""

from __future__ import annotations

import sys

import click
import uvloop

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.config import ConfigError, load_config
from agent.logs import configure


@click.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Agent configuration YAML (default: $HARMONY_AGENT_CONFIG; with neither and no "
    "HARMONY_AGENT_* variables, a zero-config local site with an embedded mesh).",
)
def run(config_path: str | None) -> None:
    """Run the agent daemon in the foreground."""
    try:
        config = load_config(config_path, allow_zero_config=True)
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    configure(config.log.level, config.log.format, site=config.site, node=config.node)

    from agent.daemon import Agent, StartupError

    try:
        code = uvloop.run(Agent(config).run())
    except StartupError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    sys.exit(code)
