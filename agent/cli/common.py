"""What every subcommand shares: the server option, one-line errors, exit codes."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn

import click

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2
DEFAULT_SERVER = "nats://127.0.0.1:4222"

# Subcommand modules, each exporting a click command (or group) of the same name.
OPTIONAL_COMMANDS = (
    ("agent.cli.status", "status"),
    ("agent.cli.apply", "apply"),
    ("agent.cli.apply", "delete"),
    ("agent.cli.check", "check"),
    ("agent.cli.cmd", "cmd"),
    ("agent.cli.ca", "ca"),
    ("agent.cli.ca", "trust"),
    ("agent.cli.demo", "demo"),
    ("agent.cli.manifests", "manifests"),
)


def register_optional_commands(group: click.Group) -> None:
    for module_name, attr in OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        command = getattr(module, attr, None)
        if isinstance(command, click.Command):
            group.add_command(command)


def fail(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    click.echo(f"harmony-agent: error: {message}", err=True)
    sys.exit(code)


def parse_timeout(value: str) -> float:
    """``--timeout`` in the operator's notation; bad input is exit 2 with one line."""
    from scores.duration import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        fail(f"--timeout: {exc}", EXIT_BAD_INPUT)
    if seconds <= 0:
        fail("--timeout: must be positive", EXIT_BAD_INPUT)
    return seconds


def default_server() -> str:
    return os.environ.get("HARMONY_NATS_URL", DEFAULT_SERVER)


def server_option(func: Any) -> Any:
    return click.option(
        "-s",
        "--server",
        "server",
        default=default_server,
        show_default="$HARMONY_NATS_URL or " + DEFAULT_SERVER,
        help="NATS URL of the mesh (comma-separated for several).",
    )(func)


def servers(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]
