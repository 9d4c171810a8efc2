"""Dynamic shell completion: application, site and agent names, read from the mesh.

A completion must never hang a shell or print an error into it: the mesh is asked with a
short deadline (``HARMONY_COMPLETION_TIMEOUT``, default 1s) and any failure completes
nothing. The connection is the one the command line would use (flags already typed,
environment, context, config).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click
from click.shell_completion import CompletionItem

TIMEOUT_ENV = "HARMONY_COMPLETION_TIMEOUT"

Lister = Callable[[click.Context], list[str]]


def _timeout() -> float:
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, "1")))
    except ValueError:
        return 1.0


def _entries(ctx: click.Context, *patterns: str) -> list[tuple[str, bytes]]:
    """Live (key, value) of ``harmony-state`` matching ``patterns``, over one connection;
    [] on any failure."""
    import asyncio

    from agent.cli.options import selection
    from agent.cli.profile import ProfileError, resolve

    try:
        profile = resolve(selection(ctx))
    except ProfileError:
        return []

    async def read() -> list[tuple[str, bytes]]:
        from agent.commands.client import open_mesh
        from agent.commands.marks import live_entries
        from mesh.names import STATE_BUCKET

        async with open_mesh(profile, _timeout()) as mesh:
            kv = await mesh.bucket(STATE_BUCKET)
            out: list[tuple[str, bytes]] = []
            for pattern in patterns:
                out += [(e.key, e.value or b"") for e in await live_entries(kv, pattern)]
            return out

    try:
        return asyncio.run(asyncio.wait_for(read(), _timeout()))
    except Exception:  # completion completes nothing rather than fail
        return []


def app_names(ctx: click.Context) -> list[str]:
    return sorted({k.split(".", 1)[1] for k, _ in _entries(ctx, "app.*")})


def agent_ids(ctx: click.Context) -> list[str]:
    return sorted({"/".join(k.split(".")[1:3]) for k, _ in _entries(ctx, "agent.*.*")})


def site_names(ctx: click.Context) -> list[str]:
    """Sites with an agent, drained sites and the sites of application placements."""
    import json

    sites: set[str] = set()
    for key, value in _entries(ctx, "agent.*.*", "drain.*", "app.*"):
        kind, _, rest = key.partition(".")
        if kind != "app":
            sites.add(rest.split(".")[0])
            continue
        try:
            placement = json.loads(value)["spec"]["placement"]["sites"]
        except (ValueError, KeyError, TypeError):
            continue
        sites.update(s for s in placement if isinstance(s, str))
    return sorted(sites)


def _complete(lister: Lister) -> Callable[[click.Context, click.Parameter, str], list[Any]]:
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        return [CompletionItem(n) for n in lister(ctx) if n.startswith(incomplete)]

    return complete


complete_apps = _complete(app_names)
complete_sites = _complete(site_names)
complete_agents = _complete(agent_ids)
