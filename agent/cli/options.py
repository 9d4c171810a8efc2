"""Options every mesh command accepts, in any position after the command name.

Each leaf command carries the connection options itself (``mesh_options``), so
``harmony-agent cmd failover ledger --to site-b -s URL`` parses like kubectl's and the nats
CLI's commands do. Groups carry them too (``cmd -s URL ping``, ``harmony-agent -s URL
status``). Values are not passed as function arguments: each option's callback records a
value that was given into ``ctx.meta`` (shared by the whole context chain), so the one
nearest the leaf wins, and ``settings(ctx)`` turns them into a connection profile and a
deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from agent.cli.common import EXIT_BAD_INPUT, fail, parse_timeout
from agent.cli.profile import Profile, ProfileError, Selection, resolve

F = TypeVar("F", bound=Callable[..., Any])
META_KEY = "harmony.options"


def _record(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None and param.name is not None:
        ctx.meta.setdefault(META_KEY, {})[param.name] = value
    return value


def given(ctx: click.Context) -> dict[str, Any]:
    """The recorded values (only those given on the command line)."""
    recorded: dict[str, Any] = ctx.meta.get(META_KEY, {})
    return recorded


class RecordedOption(click.Option):
    """An option recorded into ``ctx.meta``; ``fallback`` is the command's own default
    (kept out of click's ``default`` so that a value given to a group is not overwritten
    by the leaf's default)."""

    def __init__(self, *args: Any, fallback: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fallback = fallback


def _option(*decls: str, fallback: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    return click.option(
        *decls,
        cls=RecordedOption,
        fallback=fallback,
        default=None,
        expose_value=False,
        callback=_record,
        **kwargs,
    )


def fallback(ctx: click.Context, name: str, default: str) -> str:
    """The value given for option ``name`` anywhere on the line, else the command's own
    default for it, else ``default``."""
    value = given(ctx).get(name)
    if value is not None:
        return str(value)
    for param in ctx.command.params:
        if param.name == name and isinstance(param, RecordedOption) and param.fallback:
            return param.fallback
    return default


def mesh_options(timeout: str = "5s") -> Callable[[F], F]:
    """``-s``, the connection profile options, ``--timeout`` (default ``timeout``)."""
    options = [
        _option(
            "-s",
            "--server",
            "server",
            metavar="URL",
            help="NATS URL of the mesh, comma-separated for several "
            "[default: $HARMONY_NATS_URL, the context, the config, nats://127.0.0.1:4222].",
        ),
        _option("--context", "context", metavar="NAME", help="Use this saved connection."),
        _option(
            "--config",
            "config",
            metavar="FILE",
            help="Connect as this agent configuration does (its nats: section) "
            "[default: $HARMONY_AGENT_CONFIG].",
        ),
        _option("--creds", "creds", metavar="FILE", help="NATS credentials file."),
        _option("--tls-ca", "tls_ca", metavar="FILE", help="CA certificate(s) to trust."),
        _option("--tls-cert", "tls_cert", metavar="FILE", help="Client certificate."),
        _option("--tls-key", "tls_key", metavar="FILE", help="Client private key."),
        _option("--user", "user", metavar="NAME", help="NATS user name."),
        _option("--password-file", "password_file", metavar="FILE", help="Its password."),
        _option(
            "--timeout",
            "timeout",
            metavar="DURATION",
            fallback=timeout,
            help=f"Give up when the mesh does not answer within this long [default: {timeout}].",
        ),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def output_option(choices: Sequence[str], default: str, help: str = "") -> Callable[[F], F]:
    return _option(
        "-o",
        "--output",
        "output",
        type=click.Choice(list(choices)),
        fallback=default,
        help=(help or "Output format.") + f" [default: {default}]",
    )


def via_option(func: F) -> F:
    return _option("--via", "via", metavar="SITE/NODE", help="Ask this agent.")(func)


@dataclass(frozen=True)
class Settings:
    profile: Profile
    timeout: float
    output: str


def selection(ctx: click.Context) -> Selection:
    opts = given(ctx)
    flags = {
        "servers": opts.get("server"),
        "credentials": opts.get("creds"),
        "ca_file": opts.get("tls_ca"),
        "cert_file": opts.get("tls_cert"),
        "key_file": opts.get("tls_key"),
        "user": opts.get("user"),
        "password_file": opts.get("password_file"),
    }
    return Selection(flags=flags, context=opts.get("context"), config=opts.get("config"))


def profile(ctx: click.Context) -> Profile:
    try:
        return resolve(selection(ctx))
    except ProfileError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


def settings(ctx: click.Context) -> Settings:
    """The connection profile, the deadline in seconds and the output format."""
    return Settings(
        profile=profile(ctx),
        timeout=parse_timeout(fallback(ctx, "timeout", "5s")),
        output=fallback(ctx, "output", "text"),
    )
