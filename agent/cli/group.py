"""The root command: lazy subcommands and one-line errors.

Start-up time is import time. A subcommand's module is imported only when that subcommand
runs (or when completion or a man page needs its parameters): ``--version`` and ``--help``
import click and nothing else, ``cmd ping`` never imports rich, pydantic-settings or the
daemon. The short help of each subcommand is therefore kept in the table below
(``tests/cli/test_lazy.py`` checks that it matches each command's own docstring).

Errors: click prints a usage block and exits 2 for bad input, and lets any other exception
become a traceback. ``HarmonyGroup.main`` turns every failure into exactly one line on
stderr, ``harmony-agent: error: ...``, with exit 2 for bad input and 1 for the rest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from agent.cli.common import EXIT_BAD_INPUT, EXIT_RUNTIME, error_line

DEBUG_ENV = "HARMONY_DEBUG"


class LazyGroup(click.Group):
    """A group whose subcommands are ``module:attr`` strings, imported on first use."""

    def __init__(
        self, *args: Any, lazy: Sequence[tuple[str, str, str]] = (), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = {name: (target, short) for name, target, short in lazy}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy, *(n for n in super().list_commands(ctx) if n not in self.lazy)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        import importlib

        module_name, _, attr = self.lazy[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attr} is not a click command")
        self.add_command(command, cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands section from the table: listing never imports a subcommand."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy and name not in self.commands:
                rows.append((name, self.lazy[name][1]))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class HarmonyGroup(LazyGroup):
    """The root group: its ``main`` is where every error becomes one line."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        try:
            rv = super().main(
                args, prog_name or "harmony-agent", complete_var, standalone_mode=False, **extra
            )
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            _usage_error(exc)
        except click.exceptions.FileError as exc:
            error_line(f"{exc.ui_filename}: {exc.message}", EXIT_BAD_INPUT)
        except click.ClickException as exc:
            error_line(exc.format_message(), exc.exit_code or EXIT_RUNTIME)
        except (click.Abort, KeyboardInterrupt):
            error_line("interrupted", 130)
        except BrokenPipeError:
            # `harmony-agent events | head`: the reader left; that is not an error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            detail = str(exc).splitlines()[0] if str(exc) else ""
            error_line(
                f"internal error: {type(exc).__name__}"
                + (f": {detail}" if detail else "")
                + f" (run with {DEBUG_ENV}=1 for the traceback)",
                EXIT_RUNTIME,
            )
        # Non-standalone click returns the code of an explicit exit (--version, --help)
        # and the command's return value otherwise; our commands return None.
        sys.exit(rv if isinstance(rv, int) else 0)


def _usage_error(exc: click.UsageError) -> NoReturn:
    path = ""
    if exc.ctx is not None:
        path = exc.ctx.command_path.partition(" ")[2]
    message = " ".join(exc.format_message().split())
    if message and message[0].isupper() and not message[:2].isupper():
        message = message[0].lower() + message[1:]
    where = f"{path}: " if path else ""
    hint = f" (see 'harmony-agent {path + ' ' if path else ''}--help')"
    error_line(f"{where}{message.rstrip('.')}{hint}", EXIT_BAD_INPUT)
