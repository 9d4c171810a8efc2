"""The ``harmony-agent`` command line (CONTRACT section 6).

Exit codes: 0 success, 1 runtime failure (unreachable mesh, refused command), 2 bad input.
Every error is one line on stderr; a traceback is a bug.
"""

from __future__ import annotations

import click

from agent import __version__
from agent.cli import common
from agent.cli.run import run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harmony-agent")
def cli() -> None:
    """harmony-agent: self-healing multisite applications on a NATS JetStream mesh."""


cli.add_command(run)
common.register_optional_commands(cli)


def main() -> None:
    cli(prog_name="harmony-agent")
