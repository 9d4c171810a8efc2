"""``harmony-agent run``: the daemon in the foreground (systemd, a DaemonSet, a terminal).

Before anything starts, the addresses this agent must own (the health endpoint and, with
an embedded mesh, the nats-server's client, monitor and cluster ports) are checked: an
address already in use is bad input (exit 2, one line naming it), never a traceback and
never a silent connection to someone else's server on that port.
"""

from __future__ import annotations

import sys

import click

from agent.cli.common import EXIT_BAD_INPUT, fail


@click.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Agent configuration YAML (default: $HARMONY_AGENT_CONFIG; with neither, a "
    "zero-config local site with an embedded mesh, adjustable by HARMONY_AGENT_* variables).",
)
def run(config_path: str | None) -> None:
    """Run the agent daemon in the foreground."""
    from agent.config import ConfigError, load_config, zero_config_blockers
    from agent.health import ListenError, addresses_in_use
    from agent.logs import configure

    try:
        config = load_config(config_path, allow_zero_config=True)
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    configure(config.log.level, config.log.format, site=config.site, node=config.node)
    _explain_zero_config(config_path, zero_config_blockers())

    wanted = [("health endpoint", config.health.listen)]
    if config.nats.embedded:
        wanted += [
            ("embedded nats-server", config.nats.listen),
            ("embedded nats-server monitor", config.nats.monitor_listen),
            ("embedded nats-server cluster", config.nats.cluster_listen or ""),
        ]
    busy = addresses_in_use(wanted)
    if busy:
        fail(busy[0], EXIT_BAD_INPUT)

    import uvloop

    from agent.daemon import Agent, StartupError
    from mesh.embedded import PortInUse

    try:
        code = uvloop.run(Agent(config).run())
    except (ListenError, PortInUse, StartupError) as exc:  # e.g. taken after our check
        fail(str(exc), EXIT_BAD_INPUT)
    sys.exit(code)


def _explain_zero_config(config_path: str | None, blockers: list[str]) -> None:
    import os

    import structlog

    from agent.config import CONFIG_ENV

    if config_path or os.environ.get(CONFIG_ENV):
        return
    log = structlog.get_logger("agent.cli")
    if blockers:
        log.info(
            "zero_config_off",
            msg=f"zero-config off because {', '.join(blockers)} is set: "
            "configuration from the environment only",
            variables=blockers,
        )
    else:
        log.info("zero_config", msg="zero-config local site with an embedded mesh")
