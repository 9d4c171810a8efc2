"""``harmony-agent context``: named mesh connections, like ``nats context`` and kubeconfig.

A context is a small YAML file, ``~/.config/harmony-agent/contexts/NAME.yaml``::

    servers: [tls://nats-a.example:4222, tls://nats-b.example:4222]
    tls: {ca_file: /etc/harmony/ca.pem, cert_file: ~/op.crt, key_file: ~/op.key}
    credentials: /home/op/operator.creds     # or user + password_file
    description: production, operator rights

``context use NAME`` makes it the default; ``--context NAME`` or ``$HARMONY_CONTEXT``
picks one for one command. Flags and ``HARMONY_NATS_*`` variables still win, field by
field (``agent.cli.profile``). Files are written 0600; passwords are never printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from agent.cli.common import EXIT_BAD_INPUT, fail
from agent.cli.options import mesh_options, profile
from agent.cli.profile import (
    Profile,
    ProfileError,
    check_context_name,
    context_names,
    context_path,
    current_context,
    current_file,
    read_context,
    redact,
)


def _complete_contexts(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [n for n in context_names() if n.startswith(incomplete)]


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    path.chmod(0o600)


def _absolute(value: str | None) -> str | None:
    """Paths saved in a context are absolute: it is used from any directory."""
    return str(Path(value).expanduser().resolve()) if value else None


def _bad(exc: ProfileError) -> None:
    fail(str(exc), EXIT_BAD_INPUT)


@click.group()
def context() -> None:
    """Save and select mesh connections."""


@context.command("save")
@click.argument("name")
@click.option("--description", default=None, help="A note shown by context list.")
@click.option("--use", "select", is_flag=True, help="Also make it the current context.")
@mesh_options()
@click.pass_context
def save(ctx: click.Context, name: str, description: str | None, select: bool) -> None:
    """Save the connection this command line resolves to (flags, environment, the current
    context, --config) as context NAME."""
    import yaml

    try:
        path = context_path(name)
    except ProfileError as exc:
        _bad(exc)
    resolved = profile(ctx)
    saved = Profile(
        servers=resolved.servers,
        credentials=_absolute(resolved.credentials),
        ca_file=_absolute(resolved.ca_file),
        cert_file=_absolute(resolved.cert_file),
        key_file=_absolute(resolved.key_file),
        user=resolved.user,
        password_file=_absolute(resolved.password_file),
    )
    existed = path.exists()
    _write_private(path, yaml.safe_dump(saved.as_context(description), sort_keys=False))
    click.echo(f"context {name} {'updated' if existed else 'saved'} in {path}")
    if select:
        _write_private(current_file(), name + "\n")
        click.echo(f"current context: {name}")


@context.command("list")
def list_contexts() -> None:
    """One line per saved context; * marks the current one."""
    current = current_context()
    names = context_names()
    if not names:
        click.echo("no contexts saved (harmony-agent context save NAME -s URL ...)")
        return
    for name in names:
        mark = "*" if name == current else " "
        try:
            fields = read_context(name)
            servers = ", ".join(redact(s) for s in fields.get("servers") or ()) or "-"
        except ProfileError as exc:
            servers = f"unreadable: {exc}"
        click.echo(f"{mark} {name:<20} {servers}")


@context.command("use")
@click.argument("name", shell_complete=_complete_contexts)
def use(name: str) -> None:
    """Make NAME the default context ('-' to have none)."""
    if name == "-":
        current_file().unlink(missing_ok=True)
        click.echo("no current context")
        return
    try:
        read_context(check_context_name(name))
    except ProfileError as exc:
        _bad(exc)
    _write_private(current_file(), name + "\n")
    click.echo(f"current context: {name}")


@context.command("show")
@click.argument("name", required=False, shell_complete=_complete_contexts)
@mesh_options()
@click.pass_context
def show(ctx: click.Context, name: str | None) -> None:
    """Print the connection a command would use, and where each part comes from (with
    NAME: that context's file). Passwords are never shown."""
    import json

    if name is not None:
        try:
            fields: dict[str, Any] = read_context(name)
        except ProfileError as exc:
            _bad(exc)
        fields["servers"] = [redact(s) for s in fields.get("servers") or ()]
        click.echo(json.dumps({"context": name, **fields}, indent=2))
        return
    click.echo(json.dumps(profile(ctx).describe(), indent=2))
