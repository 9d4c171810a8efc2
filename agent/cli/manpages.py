"""Man pages generated from the command tree: one page per command and subcommand.

    python -m agent.cli.manpages docs/man      # what `make man` runs

``harmony-agent.1`` covers the program, ``harmony-agent-cmd-failover.1`` one leaf, and so on.
Pages carry no date, so regenerating an unchanged tree changes nothing (a test checks that
the committed pages are current).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

from agent import __version__

PROG = "harmony-agent"

EXIT_STATUS = (
    (
        "0",
        "Success (for apply --diff: no differences).",
    ),
    (
        "1",
        "Runtime failure: mesh unreachable, command refused, no agent answers "
        "(for apply --diff: differences found).",
    ),
    ("2", "Bad input: invalid YAML or Application, invalid name, bad option."),
    ("3", "apply --diff only: the mesh failed."),
)


def walk(
    command: click.Command,
    path: tuple[str, ...] = (PROG,),
    parent: click.Context | None = None,
) -> Iterator[tuple[tuple[str, ...], click.Command, click.Context]]:
    """Every command with its path and context, the program first, subcommands in listing
    order (contexts are chained, so inherited settings such as ``-h`` apply)."""
    ctx = command.make_context(path[-1], [], parent=parent, resilient_parsing=True)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, (*path, name), ctx)


def page_name(path: tuple[str, ...]) -> str:
    return "-".join(path) + ".1"


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _paragraphs(text: str) -> list[str]:
    """click's help text as paragraphs (blank-line separated, re-flowed)."""
    import inspect

    return [" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n") if p.strip()]


def render(path: tuple[str, ...], command: click.Command, ctx: click.Context) -> str:
    """One man page in roff (man(7) macros)."""
    title = "-".join(path).upper()
    help_text = command.help or ""
    short = command.get_short_help_str(limit=200)
    out = [
        f'.TH "{_esc(title)}" "1" "" "{PROG} {__version__}" "{PROG} manual"',
        ".SH NAME",
        f"{_esc('-'.join(path))} \\- {_esc(short)}",
        ".SH SYNOPSIS",
        f".B {_esc(' '.join(path))}",
        _esc(" ".join(command.collect_usage_pieces(ctx))),
        ".SH DESCRIPTION",
    ]
    for n, paragraph in enumerate(_paragraphs(help_text) or [short]):
        if n:
            out.append(".PP")
        out.append(_esc(paragraph))
    options = [
        p.get_help_record(ctx) for p in command.get_params(ctx) if isinstance(p, click.Option)
    ]
    if any(options):
        out.append(".SH OPTIONS")
        for record in options:
            if record is None:
                continue
            names, text = record
            out += [".TP", f"\\fB{_esc(names)}\\fR", _esc(text)]
    if isinstance(command, click.Group):
        out.append(".SH COMMANDS")
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            out += [".TP", f"\\fB{_esc(name)}\\fR", _esc(sub.get_short_help_str(limit=200))]
            out.append(f"See \\fB{_esc(page_name((*path, name))[:-2])}\\fR(1).")
    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", _esc(meaning)]
    out += [
        ".PP",
        _esc("Every error is one line on standard error, starting harmony-agent: error:."),
        ".SH SEE ALSO",
    ]
    related = [path[: i + 1] for i in range(len(path) - 1)]
    out.append(
        ", ".join(f"\\fB{_esc('-'.join(p))}\\fR(1)" for p in related) or f"\\fB{PROG}\\fR(1)"
    )
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """File name -> content, for the whole tree."""
    from agent.cli import cli

    return {page_name(path): render(path, command, ctx) for path, command, ctx in walk(cli)}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m agent.cli.manpages DIRECTORY", file=sys.stderr)
        return 2
    target = Path(argv[0])
    target.mkdir(parents=True, exist_ok=True)
    wanted = pages()
    for stale in target.glob(f"{PROG}*.1"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        (target / name).write_text(text)
    print(f"wrote {len(wanted)} man pages to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
