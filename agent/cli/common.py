"""What every subcommand shares: exit codes and the one-line error.

This module is imported by every invocation, ``--version`` included: it imports click and
the standard library only.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2


def error_line(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    """Print ``harmony-agent: error: <message>`` (always one line) and exit with ``code``."""
    text = " ".join(str(message).split()) or "failed"
    click.echo(f"harmony-agent: error: {text}", err=True)
    sys.exit(code)


def fail(message: str, code: int = EXIT_RUNTIME) -> NoReturn:
    """A command's failure: one line on stderr; 1 for runtime failures, 2 for bad input."""
    error_line(message, code)


def parse_timeout(value: str, option: str = "--timeout") -> float:
    """A duration in the operator's notation (``500ms``, ``5s``, ``1m``); bad input is exit 2."""
    from scores.duration import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        fail(f"{option}: {exc}", EXIT_BAD_INPUT)
    if seconds <= 0:
        fail(f"{option}: must be positive", EXIT_BAD_INPUT)
    return seconds


def servers(value: str) -> list[str]:
    """A comma-separated ``--server`` value as a list of URLs."""
    return [s.strip() for s in value.split(",") if s.strip()]
