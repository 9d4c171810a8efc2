"""``harmony-agent completion bash|zsh|fish``: the shell's completion script.

Install it once, e.g. ``harmony-agent completion bash > /etc/bash_completion.d/harmony-agent``
or ``harmony-agent completion fish > ~/.config/fish/completions/harmony-agent.fish``.
Commands and options complete from the command tree; application, site and agent names
complete from the mesh (``agent.cli.completion_names``: a short deadline, silent on error).
"""

from __future__ import annotations

import click

PROG = "harmony-agent"
COMPLETE_VAR = "_HARMONY_AGENT_COMPLETE"


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print a shell completion script (bash, zsh or fish)."""
    from click.shell_completion import get_completion_class

    from agent.cli import cli

    cls = get_completion_class(shell)
    assert cls is not None  # the Choice above only lets known shells through
    click.echo(cls(cli, {}, PROG, COMPLETE_VAR).source())
